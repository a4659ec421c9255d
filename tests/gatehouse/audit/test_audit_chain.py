import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from gatehouse.audit.models import AuditEvent
from gatehouse.audit.services import audit_record, audit_verify


def _three_events(alice):
    return [audit_record(actor=alice, action=f"test.{n}", data={"n": n, "note": "é"}) for n in range(3)]


def test_events_chain_to_each_other(alice):
    first, second, third = _three_events(alice)
    assert first.prev_hash == AuditEvent.GENESIS
    assert second.prev_hash == first.hash
    assert third.prev_hash == second.hash
    report = audit_verify()
    assert report.ok and report.checked == 3


def test_verify_command_passes_on_an_intact_log(alice, capsys):
    _three_events(alice)
    call_command("audit_verify")
    assert "audit log intact: 3 events verified" in capsys.readouterr().out


def test_the_log_refuses_edits_and_deletes_through_the_orm(alice):
    event = _three_events(alice)[0]
    event.action = "forged"
    with pytest.raises(TypeError):
        event.save()
    with pytest.raises(TypeError):
        event.delete()
    with pytest.raises(TypeError):
        AuditEvent.objects.filter(pk=event.pk).update(action="forged")
    with pytest.raises(TypeError):
        AuditEvent.objects.all().delete()
    assert AuditEvent.objects.get(pk=event.pk).action == "test.0"


def _raw(sql, params):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def test_editing_a_row_in_the_database_is_detected(alice):
    events = _three_events(alice)
    _raw("UPDATE audit_auditevent SET data = %s WHERE id = %s", ['{"n":99,"note":"é"}', events[1].pk])
    report = audit_verify()
    assert report.problems == [f"event #{events[1].pk} (test.1): content does not match its hash (edited)"]
    with pytest.raises(CommandError, match="audit log tampered: 1 problem"):
        call_command("audit_verify")


def test_deleting_a_row_in_the_database_is_detected(alice):
    events = _three_events(alice)
    _raw("DELETE FROM audit_auditevent WHERE id = %s", [events[1].pk])
    report = audit_verify()
    assert report.problems == [f"event #{events[2].pk}: link broken (a row before it was removed or reordered)"]


def test_rehashing_an_edited_row_still_breaks_the_next_link(alice):
    from gatehouse.audit.services import event_hash

    events = _three_events(alice)
    forged = AuditEvent.objects.get(pk=events[1].pk)
    forged.actor_label = "mallory"
    new_hash = event_hash(forged)
    _raw("UPDATE audit_auditevent SET actor_label = %s, hash = %s WHERE id = %s", ["mallory", new_hash, forged.pk])
    report = audit_verify()
    assert report.problems == [f"event #{events[2].pk}: link broken (a row before it was removed or reordered)"]


def test_values_the_database_would_rewrite_still_verify(alice):
    # jsonb turns 3.36e+23 into an integer; the chain must not depend on how the database stores numbers.
    audit_record(actor=alice, action="compute.record", data={"flops": 3.36e23, "cost": 0.1, "when": None, "n": [1, 2.5]})
    assert audit_verify().ok
