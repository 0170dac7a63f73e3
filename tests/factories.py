"""factory_boy factories. Versions are made through services (real files, real intake)."""

from __future__ import annotations

import factory
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from contributions.models import Adapter, BaseModel, Contributor
from tests.support.tiny_model import tiny_architecture

PASSWORD = "correct horse battery staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.org")
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)
    contributor = factory.RelatedFactory(
        "tests.factories.ContributorFactory", factory_related_name="user"
    )

    @factory.post_generation
    def _save(obj, create, extracted, **kwargs):
        if create:
            obj.save()


class ContributorFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Contributor
        django_get_or_create = ("user",)

    display_name = factory.LazyAttribute(lambda c: c.user.username.title())
    affiliation = "Example Lab"


class MaintainerFactory(UserFactory):
    @factory.post_generation
    def maintainers_group(obj, create, extracted, **kwargs):
        group, _ = Group.objects.get_or_create(name=settings.MAINTAINERS_GROUP)
        obj.groups.add(group)


class BaseModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = BaseModel
        django_get_or_create = ("source", "revision")

    name = "tiny-llama"
    source = "test:tiny-llama"
    revision = ""
    aliases = factory.LazyFunction(lambda: ["tiny-llama", "tests/tiny-llama"])
    architecture = factory.LazyFunction(tiny_architecture)
    local_path = "/nonexistent/tiny-llama"
    weights_sha256 = "0" * 64
    is_active = True


class AdapterFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Adapter

    owner = factory.SubFactory(UserFactory)
    slug = factory.Sequence(lambda n: f"skill-{n}")
    title = factory.LazyAttribute(lambda a: a.slug.replace("-", " ").title())
    description = "Adds three-digit numbers."
    task_tags = factory.LazyFunction(lambda: ["arithmetic"])
    languages = factory.LazyFunction(lambda: ["en"])
    license = "Apache-2.0"
    intended_use = "Answer addition questions."
    training_data_summary = "Synthetic sums."
    example_prompts = factory.LazyFunction(
        lambda: ["What is 123 + 456?", "Add 700 and 12.", "Compute 5 + 999."]
    )
