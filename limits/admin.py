from django.contrib import admin

from .models import Counter


@admin.register(Counter)
class CounterAdmin(admin.ModelAdmin):
    list_display = ("key", "count", "window_end", "blocked_until")
    search_fields = ("key",)
