def test_model_list_page_shows_visible_models_only(aurora, alice, bob, register, client):
    register(aurora, "public-model", alice, tier="open", metadata={"license": "mit"})
    register(aurora, "hidden-model", alice, tier="closed")
    page = client.get("/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "aurora/public-model" in html and "aurora/hidden-model" not in html
    client.force_login(bob)
    assert "aurora/hidden-model" in client.get("/").content.decode()


def test_model_card_page_renders_markdown_safely(aurora, alice, register, client):
    body = "# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<script>alert(1)</script>\n\n[x](javascript:alert(1))\n\n<img src=x onerror=alert(1)>\n"
    version = register(aurora, "m", alice, metadata={"license": "mit"}, body=body)
    html = client.get("/aurora/m").content.decode()
    assert "<h1>Title</h1>" in html and "<table>" in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown, never run
    assert 'href="javascript:' not in html and "<img" not in html
    assert "license: mit" not in html  # front matter is metadata, not card text
    assert version.commit[:12] in html


def test_closed_model_page_is_a_404_for_outsiders(aurora, alice, carol, register, client):
    register(aurora, "secret", alice, tier="closed")
    assert client.get("/aurora/secret").status_code == 404
    client.force_login(carol)
    assert client.get("/aurora/secret").status_code == 404
    client.force_login(alice)
    assert client.get("/aurora/secret").status_code == 200


def test_tokens_page_refuses_bad_input_and_other_peoples_tokens(alice, carol, client, token_for):
    from gatehouse.accounts.models import ApiToken

    token_for(alice, ("read",))
    alices = ApiToken.objects.get(user=alice)
    client.force_login(carol)
    no_scope = client.post("/accounts/tokens", {"name": "x"})
    assert no_scope.status_code == 400 and "Scopes must be" in no_scope.content.decode()
    assert not ApiToken.objects.filter(user=carol).exists()
    theirs = client.post("/accounts/tokens", {"revoke": alices.pk})
    assert theirs.status_code == 404
    alices.refresh_from_db()
    assert alices.revoked_at is None
    made = client.post("/accounts/tokens", {"name": "ci", "scopes": ["read", "inference"], "expires_in_days": "30"})
    html = made.content.decode()
    token = ApiToken.objects.get(user=carol)
    assert made.status_code == 200 and "shown only once" in html and token.scopes == ["read", "inference"]
    assert token.expires_at is not None and token.prefix in html


def test_catalog_filters_by_licence_task_organization_and_sorts(aurora, northwind, alice, carol, register, client,
                                                                django_assert_max_num_queries):
    register(aurora, "zeta", alice, tier="open", metadata={"license": "mit", "pipeline_tag": "text-generation"})
    register(aurora, "alpha", alice, tier="open", metadata={"license": "apache-2.0", "pipeline_tag": "fill-mask"})
    register(northwind, "breeze", carol, tier="open", metadata={"license": "mit", "pipeline_tag": "text-generation"})

    def names(query):
        html = client.get("/?" + query).content.decode()
        return [n for n in ("aurora/zeta", "aurora/alpha", "northwind/breeze") if n in html]

    assert names("license=mit") == ["aurora/zeta", "northwind/breeze"]
    assert names("task=fill-mask") == ["aurora/alpha"]
    assert names("organization=northwind") == ["northwind/breeze"]
    assert names("tier=closed") == [] and names("designation=eu-systemic-risk") == []
    html = client.get("/?sort=name").content.decode()
    assert html.index("aurora/alpha") < html.index("aurora/zeta") < html.index("northwind/breeze")
    with django_assert_max_num_queries(8):  # no query per row
        assert client.get("/?license=mit&sort=name").status_code == 200


def test_model_page_draws_the_loss_curve_of_the_run_that_made_it(aurora, alice, register, client):
    from gatehouse.registry.models import TrainingMetric, TrainingRun

    version = register(aurora, "trained", alice, tier="open")
    run = TrainingRun.objects.create(organization=aurora, model_name="trained", created_by=alice, status="succeeded",
                                     result_version=version, step=50, total_steps=50)
    TrainingMetric.objects.bulk_create([TrainingMetric(run=run, kind="step", step=s, loss=5.0 - s * 0.05)
                                        for s in range(1, 51)])
    TrainingMetric.objects.create(run=run, kind="eval", step=50, val_loss=2.7)
    html = client.get("/aurora/trained").content.decode()
    assert '<svg class="chart"' in html and 'data-series="train loss"' in html
    points = html.split('data-series="train loss"')[1].split('points="')[1].split('"')[0].split()
    assert len(points) == 50 and float(points[0].split(",")[1]) < float(points[-1].split(",")[1])  # falls (SVG y down)
    assert "step 50 of 50" in html


def test_charts_escape_labels_and_skip_what_log_axes_cannot_show():
    from gatehouse.web.charts import line_chart

    svg = line_chart({"<script>x</script>": [(1, 10.0), (10, 1.0), (0, 5.0)]}, x_label="<b>", log_x=True, log_y=True)
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "<b>" not in svg
    assert len(svg.split('points="')[1].split('"')[0].split()) == 2  # x=0 has no place on a log axis
    assert line_chart({"empty": []}) == ""


def test_scaling_view_fits_a_power_law_and_lineage_shows_the_ancestors(aurora, alice, register, client):
    from gatehouse.registry.models import ModelVersion, TrainingRun
    from gatehouse.web.charts import power_law_fit

    a, b = power_law_fit([(1e18, 4.0), (1e19, 4.0 * 10 ** -0.05), (1e20, 4.0 * 10 ** -0.1)])
    assert abs(b + 0.05) < 1e-9 and abs(a * 1e18 ** b - 4.0) < 1e-9
    versions = []
    for index, (flops, loss) in enumerate([(1e18, 4.0), (1e19, 3.5), (1e20, 3.1)]):
        version = register(aurora, f"size-{index}", alice, tier="open", seed=index)
        ModelVersion.objects.filter(pk=version.pk).update(own_flops=flops, cumulative_flops=flops)
        TrainingRun.objects.create(organization=aurora, model_name=f"size-{index}", created_by=alice,
                                   status="succeeded", result_version=version, last_loss=loss)
        versions.append(version)
    html = client.get("/aurora/size-2").content.decode()
    assert html.count('class="point" data-series="runs"') == 3 and "fit: loss = " in html
    ModelVersion.objects.filter(pk=versions[2].pk).update(base_version=versions[1])
    lineage = client.get("/aurora/size-2").content.decode().split('class="chart lineage"')[1]
    assert lineage.index("aurora/size-1@") < lineage.index("aurora/size-2@")  # oldest first


def test_model_page_shows_compute_dataset_facts_and_licence_restrictions(aurora, alice, register, client,
                                                                         django_assert_max_num_queries):
    from gatehouse.registry.models import Dataset, DatasetVersion, License
    from gatehouse.registry.services.compute import compute_record_create

    dataset = Dataset.objects.create(organization=aurora, name="corpus", provenance="web-scraped")
    dataset.licenses.set(License.objects.filter(key="mit"))
    DatasetVersion.objects.create(dataset=dataset, version="v1", documents=1200, tokens=50000,
                                  exact_duplicate_rate=0.031, personal_data_found={"email": 4})
    version = register(aurora, "m", alice, tier="open",
                       metadata={"license": "cc-by-nc-4.0", "datasets": ["aurora/corpus"]})
    compute_record_create(version=version, actor=alice, hardware="H100-SXM", flops=3e21, device_count=8,
                          wall_time_seconds=36000)
    client.get("/aurora/m")
    with django_assert_max_num_queries(30):
        html = client.get("/aurora/m").content.decode()
    assert "3.00e+21" in html and "8× H100-SXM" in html and "kWh" in html and "kg CO₂e" in html
    assert "1,200 documents" in html and "4 email" in html and "0.031 duplicates removed" in html
    assert "non-commercial" in html


def test_dataset_and_licence_pages(aurora, alice, register, client):
    from gatehouse.registry.models import Dataset, DatasetVersion, License

    dataset = Dataset.objects.create(organization=aurora, name="corpus", provenance="licensed",
                                     motivation="<b>Teaching</b>")
    dataset.licenses.set(License.objects.filter(key="mit"))
    DatasetVersion.objects.create(dataset=dataset, version="v2", documents=77, personal_data_found={"phone": 2})
    register(aurora, "open-one", alice, tier="open", metadata={"datasets": ["aurora/corpus"]})
    register(aurora, "secret-one", alice, tier="closed", metadata={"datasets": ["aurora/corpus"]})
    listing = client.get("/datasets").content.decode()
    assert "aurora/corpus" in listing and "77 docs" in listing and "incomplete" in listing
    page = client.get("/datasets/aurora/corpus").content.decode()
    assert "&lt;b&gt;Teaching&lt;/b&gt;" in page and "2 phone" in page and "not documented" in page
    assert "aurora/open-one" in page and "aurora/secret-one" not in page  # closed models stay hidden
    assert client.get("/datasets/aurora/nope").status_code == 404
    licences = client.get("/licenses").content.decode()
    assert 'id="apache-2.0"' in licences and ("not allowed" in licences or "needs review" in licences)


def test_profile_and_organization_pages_keep_rosters_and_closed_models_to_members(aurora, alice, bob, carol, register,
                                                                                   client):
    register(aurora, "open-one", alice, tier="open")
    register(aurora, "secret-one", alice, tier="closed")
    client.force_login(carol)
    outsider = client.get("/orgs/aurora").content.decode()
    assert "aurora/open-one" in outsider and "secret-one" not in outsider and "Members" not in outsider
    client.force_login(bob)
    member = client.get("/orgs/aurora").content.decode()
    assert "aurora/secret-one" in member and "alice" in member
    assert "Aurora" in client.get("/accounts/profile").content.decode()
    assert client.get("/orgs/nope").status_code == 404


def test_a_running_training_run_refreshes_its_loss_chart_and_a_finished_one_does_not(aurora, alice, register, client):
    from gatehouse.registry.models import TrainingMetric, TrainingRun

    version = register(aurora, "growing", alice, tier="open")
    run = TrainingRun.objects.create(organization=aurora, model_name="growing", created_by=alice, status="running",
                                     step=3, total_steps=100)
    TrainingMetric.objects.bulk_create([TrainingMetric(run=run, kind="step", step=s, loss=4.0 - s / 10)
                                        for s in (1, 2, 3)])
    html = client.get("/aurora/growing").content.decode()
    assert 'id="loss-chart" data-live' in html and "web/live.js" in html
    TrainingRun.objects.filter(pk=run.pk).update(status="succeeded", result_version=version)
    html = client.get("/aurora/growing").content.decode()
    assert "data-live" not in html and "live.js" not in html and '<svg class="chart"' in html



def test_the_loss_chart_is_thinned_by_the_database(aurora, alice, django_assert_max_num_queries):
    from gatehouse.registry.models import TrainingMetric, TrainingRun
    from gatehouse.web.views import _points

    run = TrainingRun.objects.create(organization=aurora, model_name="long", created_by=alice, status="running")
    logged = list(range(10, 100_001, 10)) + [100_003]  # every 10 steps, and the step it stopped at
    TrainingMetric.objects.bulk_create([TrainingMetric(run=run, kind="step", step=s, loss=1000 / s) for s in logged],
                                       batch_size=5000)
    TrainingMetric.objects.bulk_create([TrainingMetric(run=run, kind="eval", step=s, val_loss=s / 1000)
                                        for s in (250, 500, 750)])
    with django_assert_max_num_queries(3):  # the first rows, the last, the rows drawn: none of the 10,000 others
        points = _points(run, "step", "loss")
    steps = [step for step, _ in points]
    assert 300 <= len(points) <= 401 and steps == sorted(steps) and steps[0] == 10 and steps[-1] == 100_003
    assert len({b - a for a, b in zip(steps[:-2], steps[1:-1])}) == 1  # evenly spaced
    assert all(loss == 1000 / step for step, loss in points)
    assert _points(run, "eval", "val_loss") == [(250, 0.25), (500, 0.5), (750, 0.75)]  # few: every one
    assert _points(run, "nothing", "loss") == []

def test_catalog_filters_by_worst_risk_outcome(aurora, alice, register, client):
    from gatehouse.registry.models import RiskThreshold
    from gatehouse.registry.services.records import risk_assessment_record

    thresholds = list(RiskThreshold.objects.filter(domain__framework__key="openai-preparedness", key="high")[:2])
    calm = register(aurora, "calm", alice, tier="open", seed=1)
    edgy = register(aurora, "edgy", alice, tier="open", seed=2)
    for threshold in thresholds:
        risk_assessment_record(version=calm, actor=alice, threshold=threshold, outcome="below", mitigation="pre",
                               evaluator="red team")
    risk_assessment_record(version=edgy, actor=alice, threshold=thresholds[0], outcome="below", mitigation="pre",
                           evaluator="red team")
    risk_assessment_record(version=edgy, actor=alice, threshold=thresholds[1], outcome="cannot_rule_out",
                           mitigation="pre", evaluator="red team")
    below = client.get("/?risk=below").content.decode()
    assert "aurora/calm" in below and "aurora/edgy" not in below
    unsure = client.get("/?risk=cannot_rule_out").content.decode()
    assert "aurora/edgy" in unsure and "aurora/calm" not in unsure
    assert "No models match" in client.get("/?risk=nonsense").content.decode()


def test_pages_name_an_icon_we_serve_and_favicon_ico_leads_to_it(client, db):
    home = client.get("/")
    assert b'<link rel="icon" href="/static/web/favicon.svg" type="image/svg+xml">' in home.content
    redirect = client.get("/favicon.ico")
    assert redirect.status_code == 301 and redirect["Location"] == "/static/web/favicon.svg"
    icon = client.get("/static/web/favicon.svg")
    assert icon.status_code == 200 and b"<svg" in b"".join(icon.streaming_content)
