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
