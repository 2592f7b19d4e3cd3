from django.contrib import admin

from .models import Persona


@admin.register(Persona)
class PersonaAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "is_default", "created")
    search_fields = ("name", "owner__username")
    raw_id_fields = ("owner",)
