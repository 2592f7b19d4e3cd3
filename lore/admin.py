from django.contrib import admin

from .models import Lorebook


@admin.register(Lorebook)
class LorebookAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "active", "updated")
    search_fields = ("name", "owner__username")
    raw_id_fields = ("owner",)
