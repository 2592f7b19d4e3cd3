from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("accounts.urls")),
    path("", include("characters.urls")),
    path("", include("chat.urls")),
]

handler404 = "rpserver.envelope.not_found"
