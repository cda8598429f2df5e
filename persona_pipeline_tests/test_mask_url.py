"""mask_url: every credential a URL (or a line of text showing URLs) can carry is masked, and the rest
of the URL still says where."""

import pytest

from persona_pipeline.secrets import mask_url


@pytest.mark.parametrize(
    ("shown", "secret", "kept"),
    [
        ("http://user:pass-1@qdrant.example:6333", "pass-1", "http://user:***@qdrant.example:6333"),
        ("https://tok-2@qdrant.example/", "tok-2", "https://***@qdrant.example/"),
        ("http://qdrant:6333/?api_key=k-3&timeout=5", "k-3", "http://qdrant:6333/?api_key=***&timeout=5"),
        ("http://qdrant:6333?apiKey=k-4", "k-4", "http://qdrant:6333?apiKey=***"),
        ("https://h/x?access_token=t-5#frag", "t-5", "https://h/x?access_token=***#frag"),
        ("https://h/x#id_token=t-6", "t-6", "https://h/x#id_token=***"),
        ("https://h/x?key=k-7", "k-7", "https://h/x?key=***"),
        (
            "postgresql+psycopg://app:s3c@r/t@db.example:5432/persona?sslpassword=p-8&sslmode=require",
            "p-8",
            "postgresql+psycopg://app:***@db.example:5432/persona?sslpassword=***&sslmode=require",
        ),
        ("postgresql://app:pa/ss-9@db:5432/x", "pa/ss-9", "postgresql://app:***@db:5432/x"),
        (
            "failed: http://u:pw-10@[::1]:6333/collections (timeout)",
            "pw-10",
            "failed: http://u:***@[::1]:6333/collections (timeout)",
        ),
        ("host=db user=app password=pw-11 dbname=x", "pw-11", "host=db user=app password=*** dbname=x"),
        ("QDRANT_API_KEY=k-12 refused", "k-12", "QDRANT_API_KEY=*** refused"),
    ],
)
def test_credentials_are_masked_and_the_location_kept(shown, secret, kept):
    masked = mask_url(shown)
    assert secret not in masked
    assert masked == kept


@pytest.mark.parametrize(
    "plain",
    [
        "sqlite:////tmp/home/persona.db",
        "postgresql+psycopg://postgres@127.0.0.1:5432/persona",
        "http://127.0.0.1:6333",
        "http://host/path/a@b?limit=5",
        "row 3: key=device.location.city is not in the feature schema",
        "",
    ],
)
def test_what_holds_no_credential_is_left_as_it_is(plain):
    assert mask_url(plain) == plain


def test_masking_twice_is_masking_once():
    once = mask_url("http://u:p@h:1/?token=t")
    assert mask_url(once) == once
