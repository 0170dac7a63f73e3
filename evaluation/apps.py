from django.apps import AppConfig


class EvaluationConfig(AppConfig):
    name = "evaluation"
    verbose_name = "Evaluation"

    def ready(self) -> None:
        # contributions knows nothing of evaluation: evaluation asks to be told of
        # transitions (a validated version is queued for evaluation).
        from contributions.services import version_transition_listen
        from evaluation.services.runs import version_validated_queue

        version_transition_listen(version_validated_queue)
