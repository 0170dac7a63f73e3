from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Routing"

    def ready(self) -> None:
        # contributions knows nothing of routing: routing asks to be told of transitions
        # (entering or leaving ``admitted`` publishes a mixture version).
        from contributions.services import version_transition_listen
        from routing.services import mixture_follow_transition

        version_transition_listen(mixture_follow_transition)
