from rest_framework import serializers

from characters.serializers import LegacyBooleanField, NameField, decode_file


class ImportLorebookSerializer(serializers.Serializer):
    """The lorebook's JSON file as base64 (or a data URL); optionally a name and whether it is active."""

    file = serializers.CharField()
    name = NameField(required=False)
    active = LegacyBooleanField(required=False, default=True)

    def validate_file(self, value):
        return decode_file(value)


class LorebookSerializer(serializers.Serializer):
    """A change to a lorebook: its name, whether it is active, its whole JSON (the editor's)."""

    name = NameField(required=False)
    active = LegacyBooleanField(required=False)
    data = serializers.DictField(required=False)
