from asgiref.sync import async_to_sync
from django.conf import settings
from rest_framework import serializers
from rest_framework.views import APIView

from characters.serializers import decode_file
from characters.views import FileAnswerNegotiation
from chat.views import attachment
from rpserver.envelope import ok

from . import services


class ImportAccountSerializer(serializers.Serializer):
    """POST /api/v1/account/import: the account file (zip) as base64 or a data URL."""

    file = serializers.CharField()

    def validate_file(self, value):
        return decode_file(value, settings.RPSERVER["MAX_BODY_BYTES"], "the account file")


class ExportAccountView(APIView):
    content_negotiation_class = FileAnswerNegotiation

    def get(self, request):
        body, file_name = services.export_account(request.user)
        return attachment(body, "application/zip", file_name)


class ImportAccountView(APIView):
    def post(self, request):
        form = ImportAccountSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        return ok(async_to_sync(services.import_account)(request.user, form.validated_data["file"]))
