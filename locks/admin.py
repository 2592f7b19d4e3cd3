from django.contrib import admin

from .models import Lock, ServerInstance


@admin.register(ServerInstance)
class ServerInstanceAdmin(admin.ModelAdmin):
    list_display = ("id", "host", "pid", "started", "heartbeat", "dead_at")


@admin.register(Lock)
class LockAdmin(admin.ModelAdmin):
    list_display = ("name", "holder", "taken")
