from urllib.parse import quote

from django.http import HttpResponse
from rest_framework.views import APIView

from rpserver.envelope import ok

from . import services
from .entries import entries
from .serializers import ImportLorebookSerializer, LorebookSerializer


def lorebook_data(lorebook, with_data=False):
    data = {"id": lorebook.pk, "name": lorebook.name, "active": lorebook.active,
            "entries": len(entries(lorebook.data))}
    return data | {"data": lorebook.data} if with_data else data


class LorebooksView(APIView):
    def get(self, request):
        return ok({"lorebooks": [lorebook_data(book) for book in request.user.lorebooks.all()]})


class ImportLorebookView(APIView):
    def post(self, request):
        form = ImportLorebookSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        fields = form.validated_data
        book = services.parse_lorebook(fields["file"])
        lorebook = services.save_lorebook(request.user, book, name=fields.get("name"), active=fields["active"])
        return ok(lorebook_data(lorebook))


class LorebookView(APIView):
    """GET: the lorebook with its JSON. POST: change its name, active flag or JSON."""

    def get(self, request, lorebook_id):
        return ok(lorebook_data(services.get_lorebook(request.user, lorebook_id), with_data=True))

    def post(self, request, lorebook_id):
        form = LorebookSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        fields = form.validated_data
        lorebook = services.save_lorebook(request.user, fields.get("data"), name=fields.get("name"),
                                          active=fields.get("active"),
                                          lorebook=services.get_lorebook(request.user, lorebook_id))
        return ok(lorebook_data(lorebook, with_data=True))


class DeleteLorebookView(APIView):
    def post(self, request, lorebook_id):
        services.delete_lorebook(request.user, lorebook_id)
        return ok()


class ExportLorebookView(APIView):
    def get(self, request, lorebook_id):
        body, file_name = services.export_lorebook(request.user, lorebook_id)
        answer = HttpResponse(body, content_type="application/json")
        answer["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(file_name, safe='')}"
        return answer
