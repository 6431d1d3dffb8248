"""A real Django project in one module, its settings in code, for test_wsgi:
``mps serve --wsgi django_app:application``.  Nothing in it knows of mps."""
from __future__ import annotations

from typing import Any

from django.conf import settings

settings.configure(
    DEBUG=False, SECRET_KEY="mps-tests-only", ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__, USE_TZ=True,
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
)

from django.core.wsgi import get_wsgi_application  # noqa: E402 - after configure()
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from wsgi_apps import _terminated_input, validator  # noqa: E402


def hello(request: HttpRequest, name: str) -> HttpResponse:
    return HttpResponse(f"hello {name}", content_type="text/plain; charset=utf-8")


def form(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"a": request.POST.get("a"), "method": request.method,
                         "remote": request.META["REMOTE_ADDR"], "secure": request.is_secure(),
                         "q": request.GET.get("q")})


def boom(request: HttpRequest) -> Any:
    raise RuntimeError("django view failure on purpose")


urlpatterns = [path("hello/<str:name>", hello), path("form", form), path("boom", boom)]

application = validator(_terminated_input(get_wsgi_application()))
