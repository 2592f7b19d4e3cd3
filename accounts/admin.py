from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from .models import ApiToken, User


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_display = ("username", "is_guest", "is_staff", "date_joined", "last_seen")
    list_filter = ("is_guest", "is_staff", "is_active")
    fieldsets = BaseUserAdmin.fieldsets + (("rpserver", {"fields": ("is_guest", "last_seen")}),)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("user", "created", "last_used")
    readonly_fields = ("user", "digest", "created", "last_used")
