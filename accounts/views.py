from rest_framework.permissions import AllowAny
from rest_framework.views import APIView

from rpserver.envelope import ok

from . import services
from .serializers import LoginSerializer


class LoginView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    def post(self, request):
        form = LoginSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        user, key = services.log_in(**form.validated_data)
        return ok({"user_name": user.username, "token": key})


class GuestLoginView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    def post(self, request):
        user, key = services.create_guest()
        return ok({"user_name": user.username, "token": key})
