from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Routing"

    def ready(self) -> None:
        # contributions and evaluation know nothing of routing: routing asks to be told of
        # transitions (entering or leaving ``admitted`` publishes a mixture version) and
        # to be consulted before a passing version is admitted (its marginal contribution).
        from contributions.services import version_transition_listen
        from evaluation.policy import admission_check_register
        from routing.scoreboard.marginal import MIXTURE_CONTRIBUTION
        from routing.services import mixture_follow_transition

        version_transition_listen(mixture_follow_transition)
        admission_check_register(MIXTURE_CONTRIBUTION)
