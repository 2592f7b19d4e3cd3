from django.contrib import admin

from .models import StoredState


@admin.register(StoredState)
class StoredStateAdmin(admin.ModelAdmin):
    list_display = ("digest", "tokens", "nbytes", "state_model", "cached", "last_used")
    readonly_fields = ("digest", "state_model", "tokens", "nbytes", "state", "cached", "last_used", "created")
    ordering = ("-last_used",)
