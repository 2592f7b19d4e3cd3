from django.contrib import admin

from .models import Character


@admin.register(Character)
class CharacterAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "use_qa", "updated")
    list_filter = ("use_qa",)
    search_fields = ("name", "owner__username")
    raw_id_fields = ("owner",)
