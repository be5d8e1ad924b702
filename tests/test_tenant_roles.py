"""Who may do what across tenants (issue 14, defect 2): a tenant's admin acts only within its tenant;
the fleet operator acts on every tenant and on the models, which serve every tenant.

One token-secured server on the tiny model: tenants acme (admin carol, user alice) and globex (admin
gina, user bob), and operator olga (tenant ops). Each cross-tenant case the outside probe found is
here, with what the store holds afterwards.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import TINY_VERSION
from server_support import chunked, noise, pcm16
from swap_support import publish_copy
from voxloop.clients.client import RecognizerClient, VoxloopError, recognition_config
from voxloop.core.registry import Registry
from voxloop.core.store import FeedbackStore
from voxloop.server.app import BackgroundServer
from voxloop.server.config import ServerConfig

pytestmark = pytest.mark.slow  # a real server

TOKENS = {
    "carol": ("acme", "admin"), "alice": ("acme", "user"),
    "gina": ("globex", "admin"), "bob": ("globex", "user"),
    "olga": ("ops", "operator"),
}


def tokens_toml() -> str:
    return "".join(f'[[tokens]]\ntoken = "tok-{user}"\ntenant = "{tenant}"\nuser = "{user}"\nrole = "{role}"\n\n'
                   for user, (tenant, role) in TOKENS.items())


@pytest.fixture(scope="module")
def server(tiny_registry_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenant-roles")
    shutil.copytree(tiny_registry_template, root / "registry")
    publish_copy(root / "registry", TINY_VERSION, "tiny-0001-b", activate=False)
    (root / "tokens.toml").write_text(tokens_toml())
    config = ServerConfig(port=0, metrics_port=0, data_dir=root / "data", model_dir=root / "registry",
                          tokens_file=root / "tokens.toml", model_watch_interval_s=3600.0, feedback_burst=100)
    with BackgroundServer(config) as running:
        running.registry = Registry(root / "registry")
        running.store_file = config.data_dir / "feedback.sqlite3"
        yield running


def as_user(server, user: str) -> RecognizerClient:
    return RecognizerClient(server.target, token=f"tok-{user}", timeout=20)


def code_of(call) -> str:
    with pytest.raises(VoxloopError) as raised:
        call()
    return raised.value.code


def utterance_with_feedback(server, user: str, seed: int) -> str:
    """`user` streams one utterance and accepts it; returns its id."""
    with as_user(server, user) as client:
        config = recognition_config(16000, interim_results=False)
        finals = [r for response in client.streaming_recognize(chunked(pcm16(noise(0.8, seed=seed)), 3200), config)
                  for r in response.results if r.is_final]
        client.accept_transcript(finals[0].utterance_id)
    return finals[0].utterance_id


def tenant_of(server, utterance_id: str, tenant: str) -> str | None:
    """The stored utterance's owner as `tenant` sees it, None once it is deleted."""
    with FeedbackStore.sqlite(server.store_file) as store:
        try:
            return store.get_utterance(utterance_id, tenant=tenant, with_audio=False).user_id
        except LookupError:
            return None


def test_a_tenant_admin_cannot_delete_another_tenants_user_data(server):
    bobs = utterance_with_feedback(server, "bob", seed=1)
    with as_user(server, "carol") as carol:
        assert code_of(lambda: carol.delete_user_data("bob", tenant="globex")) == "PERMISSION_DENIED"
        # Without a tenant, carol's own tenant is meant: globex's bob is untouched.
        assert carol.delete_user_data("bob").utterances_deleted == 0
    assert tenant_of(server, bobs, "globex") == "bob"
    with as_user(server, "gina") as gina:  # globex's own admin may
        assert gina.delete_user_data("bob").utterances_deleted >= 1
    assert tenant_of(server, bobs, "globex") is None


def test_a_tenant_admin_deletes_its_own_users_data(server):
    alices = utterance_with_feedback(server, "alice", seed=2)
    with as_user(server, "carol") as carol:
        assert carol.delete_user_data("alice", tenant="acme").utterances_deleted >= 1
    assert tenant_of(server, alices, "acme") is None


def test_a_user_cannot_delete_data_even_in_their_own_tenant(server):
    alices = utterance_with_feedback(server, "alice", seed=3)
    with as_user(server, "alice") as alice:
        assert code_of(lambda: alice.delete_user_data("alice")) == "PERMISSION_DENIED"
    assert tenant_of(server, alices, "acme") == "alice"


def test_the_operator_deletes_user_data_in_any_tenant(server):
    bobs = utterance_with_feedback(server, "bob", seed=4)
    with as_user(server, "olga") as olga:
        assert olga.delete_user_data("bob", tenant="globex").utterances_deleted >= 1
    assert tenant_of(server, bobs, "globex") is None


def test_a_tenant_admin_reads_only_its_own_tenants_stats(server):
    utterance_with_feedback(server, "alice", seed=5)
    utterance_with_feedback(server, "bob", seed=6)
    with as_user(server, "carol") as carol:
        assert code_of(lambda: carol.feedback_stats("globex")) == "PERMISSION_DENIED"
        assert set(carol.feedback_stats().by_tenant) == {"acme"}
        assert set(carol.feedback_stats("acme").by_tenant) == {"acme"}
    with as_user(server, "olga") as olga:
        assert {"acme", "globex"} <= set(olga.feedback_stats().by_tenant)
        assert set(olga.feedback_stats("globex").by_tenant) == {"globex"}


def test_only_the_operator_changes_the_models_every_tenant_is_served(server):
    with as_user(server, "olga") as olga:
        assert olga.pin_model(TINY_VERSION).serving_version == TINY_VERSION
        for admin in ("carol", "gina"):
            with as_user(server, admin) as client:
                assert code_of(client.unpin_model) == "PERMISSION_DENIED"  # the issue: B's admin unpinned A's pin
                assert code_of(lambda: client.pin_model("tiny-0001-b")) == "PERMISSION_DENIED"  # noqa: B023
                assert code_of(lambda: client.activate_model("tiny-0001-b")) == "PERMISSION_DENIED"  # noqa: B023
                assert code_of(client.rollback_model) == code_of(client.list_models) == "PERMISSION_DENIED"
        assert server.registry.pinned().version == TINY_VERSION
        assert olga.unpin_model().serving_version == TINY_VERSION
    assert server.registry.pinned() is None
    assert server.registry.history()[-1].version == TINY_VERSION
