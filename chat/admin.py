from django.contrib import admin

from .models import Conversation, Round


class RoundInline(admin.TabularInline):
    model = Round
    fields = ("index", "user_text", "bot_text", "reply_start", "state_model", "pre_state", "post_state")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("character", "owner", "updated")
    search_fields = ("owner__username", "character__name")
    raw_id_fields = ("owner", "character")
    inlines = [RoundInline]
