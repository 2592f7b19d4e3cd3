from django.contrib import admin
from django.urls import include, path

from rpserver.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("accounts.urls")),
    path("", include("characters.urls")),
    path("", include("personas.urls")),
    path("", include("lore.urls")),
    path("", include("chat.urls")),
    path("", include("archive.urls")),
    path("", include("web.urls")),
    path("metrics", metrics_view),
]

handler404 = "rpserver.envelope.not_found"
