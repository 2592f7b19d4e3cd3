from rest_framework import serializers


class LoginSerializer(serializers.Serializer):
    user_name = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=256, trim_whitespace=False)
