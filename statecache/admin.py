from django.contrib import admin

from .models import SpilledState


@admin.register(SpilledState)
class SpilledStateAdmin(admin.ModelAdmin):
    list_display = ("digest", "tokens", "nbytes", "state_model", "last_used")
    readonly_fields = ("digest", "state_model", "tokens", "nbytes", "state", "last_used", "created")
    ordering = ("-last_used",)
