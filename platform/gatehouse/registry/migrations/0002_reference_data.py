from django.db import migrations


def load(apps, schema_editor):
    from gatehouse.registry.reference_data import load_reference_data

    load_reference_data(apps)


class Migration(migrations.Migration):
    dependencies = [("registry", "0001_initial")]
    operations = [migrations.RunPython(load, migrations.RunPython.noop)]
