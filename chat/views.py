from asgiref.sync import async_to_sync
from rest_framework.views import APIView

from characters.views import character_name
from rpserver.envelope import ok

from . import services
from .serializers import BackSerializer, TamperSerializer


def validated(serializer_class, request):
    form = serializer_class(data=request.data)
    form.is_valid(raise_exception=True)
    return form.validated_data


class LoadView(APIView):
    def post(self, request):
        return ok({"chat": services.load_chat(request.user, character_name(request))})


class ResetView(APIView):
    def post(self, request):
        return ok({"chat": async_to_sync(services.reset)(request.user, character_name(request))})


class BackView(APIView):
    def post(self, request):
        fields = validated(BackSerializer, request)
        async_to_sync(services.back)(request.user, fields["character_name"], fields["log_index"])
        return ok()


class TamperView(APIView):
    def post(self, request):
        fields = validated(TamperSerializer, request)
        async_to_sync(services.tamper)(request.user, fields["character_name"], fields["message"])
        return ok()


class TokenView(APIView):
    def post(self, request):
        count, text = services.context(request.user, character_name(request))
        return ok({"token_count": count, "token_state": text})
