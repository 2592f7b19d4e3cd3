from rest_framework.permissions import AllowAny
from rest_framework.views import APIView

from rpserver.envelope import ok
from rpserver.pipeline import client_address

from . import services
from .auth import request_token
from .serializers import LoginSerializer


def account_data(user, key):
    return ok({"user_name": user.username, "token": key})


class LoginView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    def post(self, request):
        form = LoginSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        return account_data(*services.log_in(**form.validated_data, address=client_address(request)))


class SignupView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    def post(self, request):
        form = LoginSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        return account_data(*services.sign_up(**form.validated_data, address=client_address(request),
                                              accept_language=request.headers.get("Accept-Language", "")))


class GuestLoginView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    def post(self, request):
        return account_data(*services.create_guest(client_address(request),
                                                   request.headers.get("Accept-Language", "")))


class LogoutView(APIView):
    def post(self, request):
        services.revoke_token(request_token(request))
        return ok()
