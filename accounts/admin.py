from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from .models import ApiToken, User
from .services import issue_api_key


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_display = ("username", "is_guest", "is_staff", "date_joined", "last_seen")
    list_filter = ("is_guest", "is_staff", "is_active")
    fieldsets = BaseUserAdmin.fieldsets + (("rpserver", {"fields": ("is_guest", "last_seen")}),)
    actions = ["create_api_key"]

    @admin.action(description="Create an API key for the selected users")
    def create_api_key(self, request, queryset):
        for user in queryset:
            key = issue_api_key(user, f"made in the admin by {request.user.username}")
            # Shown once: only its digest is stored.
            self.message_user(request, f"API key for {user.username}: {key}", messages.SUCCESS)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("user", "kind", "name", "created", "last_used")
    list_filter = ("kind",)
    readonly_fields = ("user", "digest", "kind", "created", "last_used")
