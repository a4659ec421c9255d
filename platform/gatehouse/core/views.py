from django.http import HttpResponse, JsonResponse
from django.template import loader

from gatehouse.core.api import error_body


def not_found(request, exception=None):
    if request.path.startswith("/api/"):
        message = f"No API endpoint at {request.path}. The API is described at /api/docs/."
        return JsonResponse(error_body(404, "not_found", message), status=404)
    html = loader.render_to_string("web/404.html", {"path": request.path}, request)
    return HttpResponse(html, status=404)


def server_error(request):
    if request.path.startswith("/api/"):
        return JsonResponse(error_body(500, "server_error", "Internal error; it has been logged."), status=500)
    return HttpResponse("<h1>Server error</h1><p>It has been logged.</p>", status=500)
