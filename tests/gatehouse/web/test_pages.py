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
