"""Prepared statements: the ORM's query compiled once and run again with each call's values must give exactly
what the queryset gives, in one query, with related objects loaded and nothing half-written."""
import pytest

from gatehouse.accounts.models import Membership
from gatehouse.core.prepared import PreparedInsert, PreparedQuery, PreparedUpdate
from gatehouse.registry.models import Model
from releases.models import AccessPolicy, InferenceBackend, InferenceCall


def _served(org, name):
    return Model.objects.filter(organization__slug=org, name=name) \
        .select_related("organization", "access_policy", "inference_backend", "latest_version") \
        .only("id", "name", "tier", "created_at", "organization__slug", "access_policy__audience",
              "inference_backend__url", "inference_backend__enabled", "latest_version__context_length").order_by()[:1]


def test_a_prepared_query_returns_what_the_queryset_returns_in_one_query(register, aurora, alice,
                                                                         django_assert_num_queries):
    served = register(aurora, "served", alice, tier="api").model
    InferenceBackend.objects.create(model=served, kind="upstream", url="http://engine/v1")
    AccessPolicy.objects.create(model=served, audience="gated")
    bare = register(aurora, "bare", alice, tier="open").model  # no policy, no backend: the LEFT JOINs find nothing
    built = []
    prepared = PreparedQuery(lambda org, name: built.append(1) or _served(org, name), org=str, name=str)
    for model in (served, bare):
        expected = _served("aurora", model.name)[0]
        with django_assert_num_queries(1):
            got = prepared(org="aurora", name=model.name)[0]
            assert (got.pk, got.name, got.tier, got.organization.slug) == \
                   (expected.pk, expected.name, expected.tier, "aurora")
            assert got.latest_version.context_length == expected.latest_version.context_length
            # Values the database stores in another form come back converted, as the queryset's (on SQLite a
            # datetime is text and a boolean an integer).
            assert got.created_at == expected.created_at and got.created_at.tzinfo is not None
            if model is served:
                assert got.access_policy.audience == "gated" and got.inference_backend.url == "http://engine/v1"
                assert got.inference_backend.enabled is True
            else:
                with pytest.raises(Model.access_policy.RelatedObjectDoesNotExist):
                    got.access_policy  # known to be absent: no query
                with pytest.raises(Model.inference_backend.RelatedObjectDoesNotExist):
                    got.inference_backend
    assert prepared(org="aurora", name="nothing") == [] and prepared(org="aurora'--", name="x") == []
    assert built == [1]  # compiled once, for every call after


def test_prepared_flat_values_take_integer_placeholders(aurora, northwind, alice, carol):
    Membership.objects.create(user=carol, organization=aurora, role=Membership.Role.MEMBER)
    prepared = PreparedQuery(lambda user_id: Membership.objects.filter(user_id=user_id)
                             .values_list("organization_id", flat=True).order_by("organization_id"), user_id=int)
    assert prepared(user_id=carol.pk) == sorted([aurora.pk, northwind.pk])
    assert prepared(user_id=alice.pk) == [aurora.pk] and prepared(user_id=10 ** 9) == []


def test_a_placeholder_that_does_not_reach_the_sql_whole_is_refused(db):
    transformed = PreparedQuery(lambda name: Model.objects.filter(name__contains=name), name=str)
    with pytest.raises(ValueError, match="must be used once, as a whole filter value"):
        transformed(name="x")  # the ORM wraps it as %x%: it cannot be substituted
    with pytest.raises(ValueError, match="placeholders are str or int"):
        PreparedQuery(lambda when: Model.objects.filter(created_at=when), when=float)
    with pytest.raises(ValueError, match="only plain model querysets"):
        PreparedQuery(lambda name: Model.objects.filter(name=name).values("id"), name=str)(name="x")


def test_prepared_insert_and_update_write_what_save_and_update_write(register, aurora, alice, carol,
                                                                     django_assert_num_queries):
    model = register(aurora, "m", alice, tier="api").model
    insert = PreparedInsert(InferenceCall)
    call = InferenceCall(user=carol, model=model, organization_id=aurora.pk, endpoint="completions", stream=True)
    with django_assert_num_queries(1):
        insert(call)
    assert call.pk and not call._state.adding
    stored = InferenceCall.objects.get(pk=call.pk)
    assert (stored.user_id, stored.token_id, stored.model_id, stored.endpoint, stored.stream, stored.status) == \
           (carol.pk, None, model.pk, "completions", True, 0)
    assert stored.created_at == call.created_at and stored.latency_ms is None  # the field defaults, as save() writes

    update = PreparedUpdate(InferenceCall, "status", "completion_tokens", "latency_ms")
    with django_assert_num_queries(1):
        assert update(call.pk, status=200, completion_tokens=7, latency_ms=1.5) == 1
    stored.refresh_from_db()
    assert (stored.status, stored.completion_tokens, stored.latency_ms, stored.prompt_tokens) == (200, 7, 1.5, 0)
    assert update(call.pk + 1000, status=500, completion_tokens=0, latency_ms=0.0) == 0
    assert InferenceCall.objects.count() == 1  # the missing row was not created
    with pytest.raises(KeyError):
        update(call.pk, status=201)  # every named field needs a value: nothing is written half
    stored.refresh_from_db()
    assert stored.status == 200
    once = PreparedUpdate(InferenceCall, "status", "completion_tokens", where={"status": 200})
    assert once(call.pk, status=502, completion_tokens=1) == 1  # the row matched the condition
    assert once(call.pk, status=503, completion_tokens=2) == 0  # it no longer does: nothing written
    stored.refresh_from_db()
    assert (stored.status, stored.completion_tokens) == (502, 1)


def test_a_prefetching_queryset_is_refused(db):
    with pytest.raises(ValueError, match="prefetch_related runs further queries"):
        PreparedQuery(lambda name: Model.objects.filter(name=name).prefetch_related("versions"), name=str)(name="x")
