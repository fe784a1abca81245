"""Config loading: defaults, every key of the documented example, errors naming file+key+reason."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cluster.dllm_params import DllmParams
from cluster.config import (ClusterConfig, ConfigError, KvTransferConfig, RouterConfig, SchedulerConfig,
                            TimeoutsConfig, WorkerGroup, default_config, load_config)

REPO = Path(__file__).resolve().parents[1]

DESIGN_EXAMPLE = """
[model]
name = "smollm2-135m-instruct"
path = ""
load_format = "auto"
dtype = "float32"
device = "cpu"
max_model_len = 4096

[router]
host = "127.0.0.1"
port = 8000
control = "tcp://127.0.0.1:0"
policy = "round_robin"
api_key = ""
max_queued_requests = 1024

[scheduler]
overlap = true
log_forward_iters = true
page_size = 16
num_pages = 2048
max_running_requests = 64
max_prefill_tokens = 4096
decode_log_interval = 1

[timeouts]
register = 120
heartbeat_interval = 1.0
heartbeat_dead_after = 3.0
decode_ready = 30
kv_transfer = 30
request = 600

[recovery]
restart_workers = true
resume_on_decode_failure = true

[[prefill]]
count = 1
[[decode]]
count = 1
[[dllm]]
count = 1
model = "smollm2-135m-instruct-dllm"
block_size = 1
algorithm = "low_confidence"
threshold = 0.9
steps_per_block = 1
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cluster.toml"
    p.write_text(textwrap.dedent(text))
    return p


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert str(path) in str(e.value)
    return e.value


def test_default_config_is_one_prefill_one_decode_with_design_defaults():
    cfg = default_config(env={})
    assert [w for w, _ in cfg.worker_ids()] == ["prefill-0", "decode-0"]
    assert cfg.router.port == 8000 and cfg.router.policy == "round_robin"
    assert cfg.scheduler == SchedulerConfig()
    assert cfg.timeouts.heartbeat_dead_after == 3.0


def test_design_example_parses_every_key(tmp_path):
    cfg = load_config(write(tmp_path, DESIGN_EXAMPLE), env={})
    assert isinstance(cfg, ClusterConfig)
    assert [w for w, _ in cfg.worker_ids()] == ["prefill-0", "decode-0", "dllm-0"]
    dllm = cfg.group_of("dllm-0")
    assert dllm.model == "smollm2-135m-instruct-dllm" and dllm.dllm.algorithm == "low_confidence"
    assert cfg.timeouts.register == 120.0 and isinstance(cfg.timeouts.register, float)
    assert cfg.recovery.resume_on_decode_failure is True
    assert cfg.source == str(tmp_path / "cluster.toml")


@pytest.mark.parametrize("name", ["local", "2p2d", "unified"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.toml", env={})
    roles = {g.role for g in cfg.groups}
    expected = {"local": {"prefill", "decode", "dllm"}, "2p2d": {"prefill", "decode"},
                "unified": {"unified"}}[name]
    assert roles == expected


def test_group_overrides_scheduler_keys_via_replace(tmp_path):
    cfg = load_config(write(tmp_path, """
        [scheduler]
        num_pages = 512
        page_size = 32
        [[prefill]]
        count = 2
        [[decode]]
        count = 1
        num_pages = 64
        overlap = false
    """), env={})
    prefill, decode = cfg.group_of("prefill-1"), cfg.group_of("decode-0")
    assert prefill.scheduler == cfg.scheduler
    assert decode.scheduler == SchedulerConfig(num_pages=64, page_size=32, overlap=False)
    assert cfg.scheduler.num_pages == 512 and cfg.scheduler.overlap is True


def test_unknown_key_names_file_key_and_reason(tmp_path):
    e = load_error(tmp_path, "[scheduler]\nnum_pagez = 3\n")
    assert e.key == "scheduler.num_pagez" and "unknown key" in e.reason


def test_unknown_table_is_rejected(tmp_path):
    e = load_error(tmp_path, "[schedular]\nnum_pages = 3\n")
    assert e.key == "schedular" and "unknown" in e.reason


def test_unknown_key_in_group_names_its_index(tmp_path):
    e = load_error(tmp_path, "[[prefill]]\n[[decode]]\n[[decode]]\nbogus = 1\n")
    assert e.key == "decode[1].bogus"


def test_dllm_key_outside_dllm_group_is_rejected(tmp_path):
    e = load_error(tmp_path, "[[prefill]]\n[[decode]]\nblock_size = 4\n")
    assert e.key == "decode[0].block_size" and "dllm" in e.reason


@pytest.mark.parametrize("text,key,reason", [
    ('[scheduler]\nnum_pages = "many"\n', "scheduler.num_pages", "expected int"),
    ("[scheduler]\noverlap = 1\n", "scheduler.overlap", "expected bool"),
    ("[router]\nport = true\n", "router.port", "expected int"),
    ("[timeouts]\nrequest = \"1s\"\n", "timeouts.request", "expected float"),
    ("[[prefill]]\n[[decode]]\nnum_pages = 1.5\n", "decode[0].num_pages", "expected int"),
])
def test_bad_type_names_key(tmp_path, text, key, reason):
    e = load_error(tmp_path, text)
    assert e.key == key and reason in e.reason


@pytest.mark.parametrize("text,key", [
    ("[[prefill]]\ncount = -1\n[[decode]]\n", "prefill[0].count"),
    ("[[prefill]]\n[[decode]]\nnum_pages = 0\n", "decode[0].num_pages"),
    ('[router]\npolicy = "random"\n', "router.policy"),
    ('[model]\nload_format = "pickle"\n', "model.load_format"),
    ('[model]\ndevice = "tpu"\n', "model.device"),
    ("[router]\nport = 70000\n", "router.port"),
    ('[router]\ncontrol = "127.0.0.1:5555"\n', "router.control"),
    ("[timeouts]\nheartbeat_interval = 5\nheartbeat_dead_after = 3\n",
     "timeouts.heartbeat_dead_after"),
    ("[timeouts]\nrequest = 0\n", "timeouts.request"),
    ('[[dllm]]\nmodel = "d"\nalgorithm = "greedy"\n', "dllm[0].algorithm"),
    ('[[dllm]]\nmodel = "d"\nblock_size = 65\n', "dllm[0].block_size"),
    ('[[dllm]]\nmodel = "d"\nthreshold = 1.5\n', "dllm[0].threshold"),
    ('[[dllm]]\nmodel = "d"\nsteps_per_block = 0\n', "dllm[0].steps_per_block"),
    ("[[dllm]]\ncount = 1\n", "dllm[0].model"),
    ('[[dllm]]\nmodel = "smollm2-135m-instruct"\n', "dllm[0].model"),
    ("[[prefill]]\ncount = 1\n", "decode"),
])
def test_bad_value_names_key(tmp_path, text, key):
    assert load_error(tmp_path, text).key == key


def test_invalid_toml_and_missing_file_name_the_file(tmp_path):
    e = load_error(tmp_path, "[model\n")
    assert "invalid TOML" in e.reason
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_env_overrides_log_forward_iters_everywhere(tmp_path):
    path = write(tmp_path, "[[prefill]]\nlog_forward_iters = true\n[[decode]]\n")
    cfg = load_config(path, env={"PDCLUSTER_LOG_FORWARD_ITERS": "0"})
    assert cfg.scheduler.log_forward_iters is False
    assert all(g.scheduler.log_forward_iters is False for g in cfg.groups)
    assert load_config(path, env={"PDCLUSTER_LOG_FORWARD_ITERS": "1"}).scheduler.log_forward_iters
    with pytest.raises(ConfigError, match="PDCLUSTER_LOG_FORWARD_ITERS"):
        load_config(path, env={"PDCLUSTER_LOG_FORWARD_ITERS": "yes"})


def test_env_override_reads_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_LOG_FORWARD_ITERS", "0")
    assert default_config().scheduler.log_forward_iters is False


def test_a_section_built_in_code_checks_its_own_bounds():
    cases = [(lambda: RouterConfig(port=70000), "RouterConfig", "port", "must be in 0..65535, got 70000"),
             (lambda: SchedulerConfig(num_pages=0), "SchedulerConfig", "num_pages", "must be >= 1, got 0"),
             (lambda: KvTransferConfig(backend="rdma"), "KvTransferConfig", "backend", "'rdma' is not one of"),
             (lambda: TimeoutsConfig(heartbeat_interval=5.0), "TimeoutsConfig", "heartbeat_dead_after",
              "must be greater than"),
             (lambda: WorkerGroup("decode", count=-1), "WorkerGroup", "count", "must be >= 0"),
             (lambda: WorkerGroup("dllm"), "WorkerGroup", "model", "needs a served model name"),
             (lambda: WorkerGroup("decode", dllm=DllmParams(block_size=4)), "WorkerGroup", "dllm",
              "only [[dllm]] groups"),
             (lambda: SchedulerConfig(overlap=1), "SchedulerConfig", "overlap", "expected bool, got int 1"),
             (lambda: ClusterConfig(groups=(WorkerGroup("prefill"),)), "<defaults>", "decode", "in pairs")]
    for build, source, key, reason in cases:
        with pytest.raises(ConfigError) as e:
            build()
        assert (e.value.source, e.value.key) == (source, key) and reason in e.value.reason
    assert TimeoutsConfig(request=5).request == 5.0 and isinstance(TimeoutsConfig(request=5).request, float)
    assert WorkerGroup("decode", gpus=[0, 1]).gpus == (0, 1)


def test_a_dllm_group_holds_its_dllm_params(tmp_path):
    cfg = load_config(write(tmp_path, '[[dllm]]\nmodel = "d"\nblock_size = 4\nalgorithm = "fixed_steps"\n'), env={})
    assert cfg.group_of("dllm-0").dllm == DllmParams(block_size=4, algorithm="fixed_steps")


def test_a_bound_read_from_toml_names_file_key_and_the_types_reason(tmp_path):
    e = load_error(tmp_path, "[router]\nport = 70000\n")
    assert str(e) == f"{tmp_path / 'cluster.toml'}: router.port: must be in 0..65535, got 70000"
    e = load_error(tmp_path, "[[prefill]]\n[[decode]]\n[[decode]]\nmax_prefill_tokens = 0\n")
    assert e.key == "decode[1].max_prefill_tokens" and e.reason == "must be >= 1, got 0"


def test_every_config_key_has_help_for_the_reference_page():
    from dataclasses import fields
    from cluster.config import SECTIONS
    for section in (*SECTIONS.values(), WorkerGroup, ClusterConfig):
        for f in fields(section):
            assert f.metadata.get("help"), f"{section.__name__}.{f.name} has no help"


@pytest.mark.parametrize("groups,key,reason", [
    ('[[dllm]]\nmodel = "d"\nprefill = "remote"\n', "dllm[0].prefill", "needs a [[prefill]] group"),
    ('[[prefill]]\n[[dllm]]\nmodel = "d"\nprefill = "auto"\npath = "/elsewhere"\n', "dllm[0].prefill",
     "prefill workers load model.path"),
    ('[[prefill]]\n[[dllm]]\nmodel = "d"\nprefill = "remote"\ntp = 2\n', "dllm[0].prefill", "tp=2"),
    ('[[prefill]]\n[[dllm]]\nmodel = "d"\nprefill = "somewhere"\n', "dllm[0].prefill", "somewhere"),
    ('[[prefill]]\n[[dllm]]\nmodel = "d"\n', "decode", "come in pairs"),
    ('[[prefill]]\n[[decode]]\nprefill = "remote"\n', "decode[0].prefill", "only [[dllm]]"),
])
def test_remote_dllm_prefill_needs_prefill_workers_on_its_weights(tmp_path, groups, key, reason):
    e = load_error(tmp_path, groups)
    assert key in str(e) and reason in str(e)


def test_prefill_workers_may_serve_only_a_dllm_group_that_prefills_remotely(tmp_path):
    cfg = load_config(write(tmp_path, '[[prefill]]\n[[dllm]]\nmodel = "d"\nprefill = "auto"\n'
                                      'remote_prefill_min_tokens = 64\n'), env={})
    dllm = cfg.groups[-1]
    assert (dllm.prefill, dllm.remote_prefill_min_tokens) == ("auto", 64) and cfg.has_remote_dllm_prefill
    assert WorkerGroup("dllm", model="d").prefill == "local"        # the default changes nothing


def test_launch_refuses_a_model_whose_heads_do_not_split_over_tp(tmp_path, capsys):
    """Caught from the model's metadata before any worker starts (not a worker restart loop)."""
    from cluster.engine.tp_splits import check_tp_splits
    from cluster.launch import cli
    path = tmp_path / "tp2.toml"
    path.write_text("[[prefill]]\ncount = 1\ntp = 2\n[[decode]]\ncount = 1\ntp = 3\n")
    assert cli.main(["launch", str(path)]) == 2
    assert f"{path}: prefill[0].tp: num_heads 9 is not divisible by tp=2" in capsys.readouterr().err
    path.write_text("[[prefill]]\ncount = 1\ntp = 3\n[[decode]]\ncount = 1\n")
    check_tp_splits(load_config(str(path)))     # SmolLM2-135M: 9 heads, 3 KV heads, 1536, 49152


def test_api_servers_zero_is_one_front_end_per_four_cores_and_one_below_eight():
    from dataclasses import replace

    from cluster.roles import api_servers
    cfg = default_config(env={})
    assert [api_servers(cfg, cores=n) for n in (1, 2, 7, 8, 16, 64, 256)] == [1, 1, 1, 2, 4, 8, 8]
    assert api_servers(cfg, env={"PDCLUSTER_THREADS": "16"}) == 4          # a pod's CPU limit
    assert api_servers(replace(cfg, router=replace(cfg.router, api_servers=3)), cores=2) == 3


def test_the_host_tier_is_allowed_beside_tensor_parallel_workers(tmp_path):
    path = tmp_path / "tier.toml"
    path.write_text("[cache]\nhost_tier_gb = 1\n[[unified]]\ncount = 1\ntp = 3\n")
    assert load_config(str(path)).cache.host_tier_gb == 1


def test_tp_invariant_with_packed_cpu_weights_is_an_error_naming_cpu_weights_float32(tmp_path):
    e = load_error(tmp_path, "[model]\ntp_invariant = true\n")   # cpu_weights "native" by default
    assert e.key == "model.tp_invariant" and 'cpu_weights = "float32"' in e.reason
    cfg = load_config(write(tmp_path, '[model]\ntp_invariant = true\ncpu_weights = "float32"\n'), env={})
    assert cfg.model.tp_invariant
    assert load_config(write(tmp_path, '[model]\ntp_invariant = true\ndevice = "cuda"\n'), env={}).model.tp_invariant
