"""The leaderboard over the API, public: what the /leaderboard/ page shows, as JSON, with
the same filters as query parameters. Stored aggregates only (routing.leaderboard.selectors):
no example, prompt or answer is ever in it."""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from routing.leaderboard import selectors


class LeaderboardQuery(serializers.Serializer):
    task = serializers.CharField(
        required=False, allow_blank=True, max_length=64, help_text="A task's slug."
    )
    language = serializers.CharField(
        required=False, allow_blank=True, max_length=32, help_text="An adapter language."
    )
    license = serializers.CharField(
        required=False, allow_blank=True, max_length=32, help_text="An SPDX license id."
    )


class FiltersOut(serializers.Serializer):
    task = serializers.CharField()
    language = serializers.CharField()
    license = serializers.CharField()


class BoardRowOut(serializers.Serializer):
    label = serializers.CharField(help_text='The board\'s key: "embedding", "embedding/topk".')
    router = serializers.CharField(help_text="Empty for the merged adapter.")
    method = serializers.CharField(help_text='"top1" for a router on its own.')
    score = serializers.FloatField(allow_null=True)
    minus_base = serializers.FloatField(allow_null=True)
    minus_best_single = serializers.FloatField(allow_null=True)
    over_oracle = serializers.FloatField(allow_null=True)
    accuracy = serializers.FloatField(
        allow_null=True, help_text="Routers only: the share of picks as good as the best."
    )
    solved = serializers.FloatField(allow_null=True, help_text="Methods only.")
    emergent = serializers.FloatField(
        allow_null=True,
        help_text="Methods only: the share solved while no single model solves it.",
    )
    deployed = serializers.BooleanField(help_text="What the mixture serves by default.")


class SplitBoardOut(serializers.Serializer):
    name = serializers.CharField(help_text="hidden, paraphrase or composite.")
    title = serializers.CharField()
    n = serializers.IntegerField()
    base = serializers.FloatField(allow_null=True)
    best_single_model = serializers.CharField()
    best_single_version = serializers.IntegerField(allow_null=True)
    best_single = serializers.FloatField(allow_null=True)
    oracle = serializers.FloatField(allow_null=True)
    routed = serializers.FloatField(allow_null=True, help_text="The mixture's own router.")
    routers = BoardRowOut(many=True)
    methods = BoardRowOut(many=True)


class BoardSummaryOut(serializers.Serializer):
    mixture = serializers.IntegerField()
    finished_at = serializers.DateTimeField(allow_null=True)
    router = serializers.CharField()
    composition = serializers.CharField()
    members = serializers.IntegerField()
    task = serializers.CharField(help_text="The task the splits are narrowed to, or empty.")
    task_title = serializers.CharField()
    splits = SplitBoardOut(many=True)
    methods_failed = serializers.BooleanField()
    methods_pending = serializers.BooleanField(
        help_text="The routers' figures are final; the mixing methods are being measured."
    )


class HistorySeriesOut(serializers.Serializer):
    split = serializers.CharField()
    title = serializers.CharField()
    mixtures = serializers.ListField(child=serializers.IntegerField())
    base = serializers.ListField(child=serializers.FloatField(allow_null=True))
    best_single = serializers.ListField(child=serializers.FloatField(allow_null=True))
    routed = serializers.ListField(child=serializers.FloatField(allow_null=True))
    oracle = serializers.ListField(child=serializers.FloatField(allow_null=True))


class TaskEntryOut(serializers.Serializer):
    model_id = serializers.CharField()
    title = serializers.CharField()
    version = serializers.IntegerField()
    contributor = serializers.CharField()
    license = serializers.CharField()
    languages = serializers.ListField(child=serializers.CharField())
    admitted_at = serializers.DateTimeField()
    n = serializers.IntegerField()
    base_score = serializers.FloatField()
    adapter_score = serializers.FloatField()
    delta = serializers.FloatField(help_text="adapter_score - base_score.")
    ci_low = serializers.FloatField(help_text="95% bootstrap interval of delta.")
    ci_high = serializers.FloatField()


class TaskBoardOut(serializers.Serializer):
    slug = serializers.CharField()
    title = serializers.CharField()
    suite = serializers.CharField()
    entries = TaskEntryOut(many=True, help_text="Ranked by adapter_score, best first.")


class ContributionOut(serializers.Serializer):
    model_id = serializers.CharField()
    title = serializers.CharField()
    version = serializers.IntegerField()
    license = serializers.CharField()
    measured = serializers.BooleanField()
    with_it = serializers.FloatField(
        allow_null=True, help_text="The mixture's routed score with it, at admission."
    )
    without = serializers.FloatField(allow_null=True)
    delta = serializers.FloatField(allow_null=True, help_text="Null: not measured.")
    requests = serializers.IntegerField()


class ContributorOut(serializers.Serializer):
    name = serializers.CharField()
    adapters = ContributionOut(many=True)
    requests = serializers.IntegerField()
    share = serializers.FloatField(
        allow_null=True, help_text="Of every answer served in usage_days; null with none."
    )


class ChoiceOut(serializers.Serializer):
    value = serializers.CharField()
    label = serializers.CharField()


class LeaderboardOut(serializers.Serializer):
    filters = FiltersOut(help_text="The filters applied.")
    ignored = serializers.DictField(
        child=serializers.CharField(), help_text="Filter values that match nothing, not applied."
    )
    active_mixture = serializers.IntegerField(allow_null=True)
    active_board_status = serializers.CharField(
        help_text="Empty when the board is the active mixture's; else queued, running, "
        "failed or missing (and the board is the newest one scored)."
    )
    board = BoardSummaryOut(allow_null=True)
    board_has_task = serializers.BooleanField()
    history = HistorySeriesOut(many=True)
    tasks = TaskBoardOut(many=True)
    contributors = ContributorOut(many=True)
    usage_days = serializers.IntegerField()
    total_requests = serializers.IntegerField()
    task_choices = ChoiceOut(many=True)
    language_choices = ChoiceOut(many=True)
    license_choices = ChoiceOut(many=True)


class LeaderboardView(APIView):
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="leaderboard",
        summary="The public leaderboard: scoreboard, history, per task and per contributor",
        parameters=[LeaderboardQuery],
        responses={200: LeaderboardOut},
        tags=["scoreboard"],
    )
    def get(self, request: Request) -> Response:
        query = LeaderboardQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        board = selectors.leaderboard(**query.validated_data)
        return Response(LeaderboardOut(board).data)


urlpatterns = [path("leaderboard/", LeaderboardView.as_view(), name="leaderboard")]
