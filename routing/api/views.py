"""The scoreboard over the API, public: what each mixture version's composed system scores
on the union of the built-in suites' hidden and paraphrase splits. Aggregates only: no
example, prompt or answer is ever in a board."""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from routing.scoreboard import selectors


class BoardOut(serializers.Serializer):
    mixture = serializers.IntegerField(source="mixture.number")
    status = serializers.CharField()
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    figures = serializers.JSONField(
        help_text="Per split (hidden, paraphrase): n, base, adapters (each alone), "
        "best_single, oracle, routers (score, routed_over_oracle, routed_minus_best_single, "
        "accuracy, picks) and tasks (the same per task). Empty until status is done."
    )


class HistoryPoint(serializers.Serializer):
    mixture = serializers.IntegerField()
    finished_at = serializers.DateTimeField()
    adapters = serializers.IntegerField()
    split = serializers.CharField()
    base = serializers.FloatField(allow_null=True)
    best_single = serializers.FloatField(allow_null=True)
    routed = serializers.FloatField(allow_null=True)
    oracle = serializers.FloatField(allow_null=True)
    router_accuracy = serializers.FloatField(allow_null=True)


NOT_FOUND = OpenApiResponse(description="No scoreboard (yet) for that mixture version.")


class LatestBoardView(APIView):
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="scoreboard_latest",
        summary="The newest finished scoreboard (normally the active mixture's)",
        responses={200: BoardOut, 404: NOT_FOUND},
        tags=["scoreboard"],
    )
    def get(self, request: Request) -> Response:
        return Response(BoardOut(selectors.board_latest()).data)


class BoardView(APIView):
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="scoreboard_of_mixture",
        summary="One mixture version's scoreboard, whatever its state",
        responses={200: BoardOut, 404: NOT_FOUND},
        tags=["scoreboard"],
    )
    def get(self, request: Request, number: int) -> Response:
        return Response(BoardOut(selectors.board_of(number=number)).data)


class HistoryView(APIView):
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="scoreboard_history",
        summary="Headline figures of every finished scoreboard, oldest first (for charts)",
        responses={200: HistoryPoint(many=True)},
        tags=["scoreboard"],
    )
    def get(self, request: Request) -> Response:
        return Response(HistoryPoint(selectors.board_history(), many=True).data)


urlpatterns = [
    path("scoreboard/", LatestBoardView.as_view(), name="scoreboard-latest"),
    path("scoreboard/history/", HistoryView.as_view(), name="scoreboard-history"),
    path("scoreboard/<int:number>/", BoardView.as_view(), name="scoreboard"),
]
