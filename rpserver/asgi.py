"""The ASGI application: the request pipeline around Channels consumers for the streams and Django for the rest."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rpserver.settings")
django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from chat.routing import http_routes  # noqa: E402
from openai_api.routing import http_routes as openai_routes  # noqa: E402
from rpserver import metrics  # noqa: E402
from rpserver.pipeline import Pipeline  # noqa: E402

http_application = Pipeline(URLRouter(http_routes + openai_routes + [re_path(r"", django_application)]))
if metrics.enabled():  # counted only where /metrics can be read
    http_application = metrics.MetricsMiddleware(http_application, stream_routes=http_routes + openai_routes)

application = ProtocolTypeRouter({
    "http": http_application,
})
