from django.db import migrations


def load(apps, schema_editor):
    from gatehouse.registry.reference_data import load_reference_data

    load_reference_data(apps)  # idempotent upsert; adds PSF-2.0 (the training module's demo corpus licence)


class Migration(migrations.Migration):
    dependencies = [("registry", "0003_ordering_and_recent_index")]
    operations = [migrations.RunPython(load, migrations.RunPython.noop)]
