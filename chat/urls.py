from django.urls import path

from . import views

urlpatterns = [
    path("characters/load", views.LoadView.as_view()),
    path("chat/reset", views.ResetView.as_view()),
    path("chat/back", views.BackView.as_view()),
    path("chat/tamper", views.TamperView.as_view()),
    path("debug/token", views.TokenView.as_view()),
    # The conversation tree's REST API (the streams are in chat.routing).
    path("api/v1/chats", views.ChatListView.as_view()),
    path("api/v1/chats/import", views.ImportChatView.as_view()),
    path("api/v1/chats/<int:chat_id>", views.ChatView.as_view()),
    path("api/v1/chats/<int:chat_id>/export", views.ExportChatView.as_view()),
    path("api/v1/chats/<int:chat_id>/context", views.ChatContextView.as_view()),
    path("api/v1/chats/<int:chat_id>/switch", views.SwitchView.as_view()),
    path("api/v1/chats/<int:chat_id>/edit", views.EditView.as_view()),
    path("api/v1/chats/<int:chat_id>/delete", views.DeleteView.as_view()),
    path("api/v1/chats/<int:chat_id>/undo", views.UndoView.as_view()),
    path("api/v1/chats/<int:chat_id>/fork", views.ForkView.as_view()),
    path("api/v1/chats/<int:chat_id>/discard", views.DiscardView.as_view()),
]
