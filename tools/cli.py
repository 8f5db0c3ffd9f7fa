"""`fedrec` command line. Each command parses options and calls one library function."""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from fedrec.errors import FedrecError
from fedrec.privacy.budget import RegionBudget

app = typer.Typer(help="Federated, differentially private search and recommendation for regional silos.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Turn raw transactions into regional silos.", no_args_is_help=True)
model_app = typer.Typer(help="Encoders for the teacher.", no_args_is_help=True)
privacy_app = typer.Typer(help="Plan a region's privacy budget, see what it has spent, repair its ledger.", no_args_is_help=True)
config_app = typer.Typer(help="The settings --config and --set change.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(privacy_app, name="privacy")
app.add_typer(config_app, name="config")

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "online-retail" / "online_retail.csv.gz"
ConfigOption = typer.Option(None, "--config", help="TOML file with \\[model], \\[train], \\[federation] and \\[distill] tables.")
SetOption = typer.Option([], "--set", help="Override one setting, e.g. --set train.lr=0.0005 (repeatable; "
                                            "`fedrec config show` lists them all).")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@app.callback()
def _start() -> None:
    """Before every command: the library's progress messages (`logging`) print as its output."""
    from fedrec.edge_runtime.messages import print_messages

    print_messages()


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback.

    SIGTERM is handled like Ctrl-C, so commands that started Flower processes stop them."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except FedrecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def _overrides(pairs: List[str]) -> dict:
    from fedrec.config import parse_overrides

    return parse_overrides(pairs)


def _config(config: Optional[Path], overrides: List[str], encoder: Optional[str] = None):
    from fedrec.config import FedrecConfig

    values = _overrides(overrides)
    if encoder is not None:
        values["model.encoder"] = encoder
    loaded = FedrecConfig.load(config, values)
    if loaded.model.encoder:       # checkpoints record it: a path that still means the same folder elsewhere
        loaded.model.encoder = str(Path(loaded.model.encoder).resolve())
    return loaded


def _region(value: str, option: str) -> str:
    """A region name given on the command line, normalised (`EU` is `eu`); an error names the option."""
    from fedrec.data.regions import region_name
    from fedrec.errors import DataError

    try:
        return region_name(value)
    except DataError as exc:
        raise FedrecError(f"{option}: {exc}") from None


def _regions(spec: str, data: Path) -> list[str]:
    """The regions `--regions` names ('all' or a comma list), checked against DATA's silos up front."""
    from fedrec.data.silo import dataset_regions

    names = [] if spec.strip().lower() in ("", "all") else \
        [_region(name, "--regions") for name in spec.split(",") if name.strip()]
    return dataset_regions(data, names)


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOption, set_: List[str] = SetOption) -> None:
    """Every setting with its value (the default unless --config or --set change it), meaning and range."""
    typer.echo(_config(config, set_).describe())


@data_app.command("prepare")
def data_prepare(
    source: Path = typer.Argument(..., help="Online Retail file (CSV, CSV.GZ, XLSX) or a generic interactions file (CSV/Parquet)."),
    out: Path = typer.Option(..., "--out", help="Output folder: catalog.parquet and one silo folder per region."),
    catalog: Optional[Path] = typer.Option(None, help="Catalog file for the generic format."),
    region_map: Optional[Path] = typer.Option(None, help="JSON/TOML country→region mapping (Online Retail)."),
    region: Optional[str] = typer.Option(None, help="Region of every row, for a generic file without a region column."),
    queries: List[str] = typer.Option([], "--queries", metavar="REGION=FILE",
                                      help="A region's search log (query,item_id[,relevance][,user_id][,timestamp]); "
                                           "repeatable, one per region. A region may have only a search log."),
) -> None:
    """Clean, split by basket and write one silo per region plus the shared public catalog."""
    from fedrec.data.prepare import prepare
    from fedrec.data.regions import RegionMap

    regions = RegionMap.from_file(region_map) if region_map else RegionMap.standard()
    default_region = _region(region, "--region") if region is not None else None
    result = prepare(source, out, catalog=catalog, regions=regions, default_region=default_region,
                     queries=_search_logs(queries))
    typer.echo(format_summary(result.summary))
    typer.echo(f"wrote {result.out}")


def _search_logs(specs: List[str]) -> dict[str, Path]:
    """--queries REGION=FILE options as region → file, each region once."""
    logs: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not file.strip():
            raise FedrecError(f"--queries {spec!r}: expected REGION=FILE, e.g. --queries eu=eu_queries.csv")
        name = _region(name, "--queries")
        if name in logs:
            raise FedrecError(f"--queries: region {name} is given twice ({logs[name]} and {file.strip()})",
                              hint="Merge that region's search logs into one file.")
        logs[name] = Path(file.strip())
    return logs


def format_summary(summary: dict) -> str:
    columns = ["users", "users_train_only", "users_with_val", "users_with_test", "items",
               "train_interactions", "val_interactions", "test_interactions"]
    header = f"{'region':<8}" + "".join(f"{c:>20}" for c in columns)
    rows = [header, "-" * len(header)]
    rows += [f"{r:<8}" + "".join(f"{s[c]:>20}" for c in columns) for r, s in summary["regions"].items()]
    dropped = {**summary["cleaning"], **summary["split"]}
    rows.append("cleaning and split: " + ", ".join(f"{k}={v}" for k, v in dropped.items()))
    rows.append(f"catalog items: {summary['catalog_items']}")
    for name, log in summary.get("queries", {}).items():
        rows.append(f"search log {name}: {log['queries']:,} queries from {log['rows_read']:,} rows; unit of privacy: "
                    f"{log['privacy_unit']} ({log['privacy_units']:,} units, {log['users_with_baskets_too']:,} who "
                    f"also bought); {log['judged_not_relevant']:,} pairs judged not relevant, "
                    f"{log['queries_without_relevant_items']:,} queries with no relevant item (not trained on), "
                    f"{log['repeated_rows_merged']:,} repeated rows merged")
    return "\n".join(rows)


@model_app.command("tiny")
def model_tiny(out: Path = typer.Option(..., "--out"), hidden: int = 32, layers: int = 2, heads: int = 2,
               seed: int = 0) -> None:
    """Write a tiny randomly initialised encoder (for tests and quick trials)."""
    from fedrec.model.teacher import create_random_encoder

    typer.echo(f"wrote {create_random_encoder(out, hidden, layers, heads, seed)}")


# -- a region's budget ---------------------------------------------------------------------------
def _budget(no_dp: bool, epsilon: float, delta: float, max_grad_norm: float, noise_multiplier: float,
            accountant: str):
    budget = RegionBudget(epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm,
                          noise_multiplier=noise_multiplier, accountant=accountant, enabled=not no_dp)
    budget.validate()
    return budget


NoDP = typer.Option(False, "--no-dp", help="Train this region WITHOUT differential privacy (explicit opt-out).")
# The budget's defaults are RegionBudget's: one source for the CLI, node configs and the library.
Epsilon = typer.Option(RegionBudget.epsilon, help="The region's lifetime privacy budget ε: every run on its data spends from it.")
Delta = typer.Option(RegionBudget.delta, help="δ of the region's (ε, δ) guarantee; must be below 1/users.")
MaxGradNorm = typer.Option(RegionBudget.max_grad_norm, help="C: each user's gradient is clipped to this norm.")
NoiseMultiplier = typer.Option(RegionBudget.noise_multiplier, help="σ; 0 derives it from ε for the planned rounds.")
Accountant = typer.Option(RegionBudget.accountant, help="prv (default) or rdp.")


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="Output folder of `fedrec data prepare`."),
    out: Path = typer.Option(..., "--out", help="Checkpoint folder (adapters, config, history)."),
    regions: str = typer.Option("all", help="'all' (central, pooled) or a comma list such as 'eu'."),
    encoder: Optional[str] = typer.Option(None, help="Encoder directory (default: bundled all-MiniLM-L6-v2)."),
    dp: bool = typer.Option(False, "--dp", help="Train one region's data alone under user-level DP, spending "
                                                "from its ledger (federation.rounds rounds of DP-SGD)."),
    state_dir: Optional[Path] = typer.Option(None, help="With --dp: the region's records; default DATA/<region>/.fedrec."),
    epsilon: float = Epsilon, delta: float = Delta, max_grad_norm: float = MaxGradNorm,
    noise_multiplier: float = NoiseMultiplier, accountant: str = Accountant,
    config: Optional[Path] = ConfigOption,
    set_: List[str] = SetOption,
) -> None:
    """Train the teacher: without privacy on pooled regions (upper bound) or one region (lower
    bound), or with --dp on one region's data, as that region would on its own."""
    cfg = _config(config, set_, encoder)
    names = _regions(regions, data)            # before the slow imports: a mistake fails at once
    if dp:
        from fedrec.federation.region import RegionSettings, default_state_dir, train_alone

        if len(names) != 1:
            raise FedrecError("--dp trains one region's data against that region's ledger",
                              hint="Pass --regions NAME (e.g. --regions eu).")
        budget = _budget(False, epsilon, delta, max_grad_norm, noise_multiplier, accountant)
        settings = RegionSettings(names[0], str(data / names[0]), str(state_dir or default_state_dir(data / names[0])), budget)
        typer.echo(f"region {names[0]} alone under DP (lifetime ε={epsilon:g}, δ={delta:g}; ledger in {settings.state_dir})")
        typer.echo(f"saved {train_alone(settings, cfg, out)}")
        return
    typer.echo(f"loading the silos of {', '.join(names)}")
    from fedrec.data.silo import load_dataset
    from fedrec.model.teacher import Teacher, pick_device
    from fedrec.training.trainer import fit

    silos = load_dataset(data, names)
    catalog = next(iter(silos.values())).catalog
    typer.echo(f"encoding the catalog's {len(catalog):,} item texts with the frozen encoder")
    teacher = Teacher(cfg.model, catalog).to(pick_device())
    result = fit(teacher, silos, cfg, out)
    quality = "no validation users" if math.isnan(result.best_val_ndcg) else f"val NDCG@10 {result.best_val_ndcg:.4f}"
    typer.echo(f"best epoch {result.best_epoch}: {quality}; saved {out}")


@app.command()
def evaluate(
    data: Path = typer.Option(..., "--data", help="Output folder of `fedrec data prepare`."),
    checkpoint: List[Path] = typer.Option([], "--checkpoint", help="Teacher or student checkpoint(s) to compare."),
    regions: str = typer.Option("all", help="'all' or a comma list of regions to evaluate on."),
    split: str = typer.Option("test", help="'test' or 'val'."),
    peers: bool = typer.Option(True, help="The non-private peers: popularity (global, per region), "
                                           "co-occurrence, ItemKNN, EASE (λ chosen on validation)."),
    zero_shot: bool = typer.Option(True, help="The pretrained encoder alone (item text similarity)."),
    encoder: Optional[str] = typer.Option(None, help="Encoder directory for the zero-shot model."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
) -> None:
    """Rank the full catalog for every test user and compare models per region."""
    if split not in ("test", "val"):
        raise FedrecError(f"--split must be 'test' or 'val', got {split!r}")
    names = _regions(regions, data)
    typer.echo(f"loading the silos of {', '.join(names)}")
    from fedrec.atomic import write_json
    from fedrec.data.silo import load_dataset
    from fedrec.evaluation.evaluate import build_rankers, evaluate as run, format_report

    silos = load_dataset(data, names)
    rankers = build_rankers(silos, checkpoint, peers=peers, zero_shot=zero_shot, encoder=encoder)
    report = run(rankers, silos, split)
    typer.echo(format_report(report))
    if json_out:
        write_json(json_out, {"split": split, "data": str(data), "report": report})
        typer.echo(f"wrote {json_out}")


# -- federation ----------------------------------------------------------------------------------


@app.command()
def certs(out: Path = typer.Option(..., "--out", help="Folder for ca.crt, server.pem, server.key and node keys."),
          host: List[str] = typer.Option(["127.0.0.1", "localhost"], help="Names the SuperLink is reached by."),
          node: List[str] = typer.Option([], help="Create an authentication key pair for this SuperNode name."),
) -> None:
    """Create a development CA, a SuperLink certificate and SuperNode key pairs."""
    from fedrec.federation.certs import create_dev_pki, create_node_key

    tls = create_dev_pki(out, host)
    typer.echo(f"CA {tls.ca}\nSuperLink certificate {tls.cert}, key {tls.key}")
    for name in node:
        private, public = create_node_key(out, name)
        typer.echo(f"node {name}: private key {private} (stays with the region), public key {public} (register it)")


@app.command()
def server(
    run_dir: Path = typer.Option(..., "--run-dir", help="Run folder: config, checkpoints, metrics, final teacher."),
    catalog: Path = typer.Option(..., help="The public catalog every region shares (catalog.parquet of `fedrec data prepare`)."),
    rounds: Optional[int] = typer.Option(None, help="Number of rounds (default from the config)."),
    min_regions: Optional[int] = typer.Option(None, help="Fewest regions that must reply for a round to count."),
    resume: bool = typer.Option(False, help="Continue the run in --run-dir from its last completed round."),
    listen: str = typer.Option("127.0.0.1:8000", help="Address for the SuperLink this command starts."),
    superlink: Optional[str] = typer.Option(None, help="Attach to a running SuperLink at HOST:PORT instead."),
    certs_dir: Optional[Path] = typer.Option(None, "--certs", help="Folder with ca.crt, server.pem, server.key."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain-text HTTP (explicit opt-out of TLS)."),
    auth: bool = typer.Option(False, help="Only registered SuperNodes may join (needs TLS)."),
    register: List[Path] = typer.Option([], help="Register this SuperNode public key (repeatable)."),
    config: Optional[Path] = ConfigOption,
    set_: List[str] = SetOption,
) -> None:
    """Coordinate a federation: start (or attach to) a SuperLink, submit the run, follow it."""
    from fedrec.federation.certs import ServerTLS
    from fedrec.federation.launch import serve

    cfg = _config(config, set_)
    cfg.federation.catalog = str(catalog)
    if rounds is not None:
        cfg.federation.rounds = rounds
    if min_regions is not None:
        cfg.federation.min_regions = min_regions
    if not insecure and certs_dir is None:
        raise FedrecError("TLS is on by default and needs --certs DIR",
                          hint="Create one with `fedrec certs --out DIR`, or pass --insecure on a trusted network.")
    try:
        history = serve(cfg, run_dir, listen=listen, superlink=superlink,
                        tls=None if insecure else ServerTLS.in_dir(certs_dir), auth=auth, register=register,
                        resume=resume)
    except KeyboardInterrupt:
        typer.echo("interrupted")
        raise typer.Exit(130)
    typer.echo(f"done: {len(history)} round(s) in this run folder; final teacher in {run_dir / 'final'}")


@app.command()
def client(
    region: str = typer.Option(..., help="This region's name, e.g. eu."),
    data: Path = typer.Option(..., help="This region's silo folder (OUT/<region> of `fedrec data prepare`)."),
    superlink: str = typer.Option(..., help="The coordinator's SuperLink HOST:PORT."),
    state_dir: Optional[Path] = typer.Option(None, help="The region's own records (signed ledger, key, sent updates); default DATA/.fedrec."),
    root_cert: Optional[Path] = typer.Option(None, help="CA certificate that signed the SuperLink's certificate."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain-text HTTP (explicit opt-out of TLS)."),
    auth_key: Optional[Path] = typer.Option(None, help="This node's private key, when the SuperLink requires registered nodes."),
    no_dp: bool = NoDP, epsilon: float = Epsilon, delta: float = Delta, max_grad_norm: float = MaxGradNorm,
    noise_multiplier: float = NoiseMultiplier, accountant: str = Accountant,
) -> None:
    """Join a federation as one region (a Flower SuperNode). The privacy budget is set here."""
    if not insecure and root_cert is None:
        raise FedrecError("TLS is on by default and needs --root-cert CA.crt",
                          hint="Pass the coordinator's CA certificate, or --insecure on a trusted network.")
    region = _region(region, "--region")
    from fedrec.federation.launch import join
    from fedrec.federation.region import RegionSettings, default_state_dir

    budget = _budget(no_dp, epsilon, delta, max_grad_norm, noise_multiplier, accountant)
    node = RegionSettings(region, str(data), str(state_dir or default_state_dir(data)), budget)
    process = None
    try:
        process = join(node, superlink, None if insecure else root_cert, auth_key)
        typer.echo("connected; waiting for rounds (Ctrl-C to leave)")
        code = process.popen.wait()
        raise FedrecError(f"the SuperNode exited with code {code}; see {process.log}")
    except KeyboardInterrupt:
        typer.echo("leaving the federation")
    finally:
        if process is not None:
            process.stop()


@app.command()
def simulate(
    data: Path = typer.Option(..., "--data", help="Output folder of `fedrec data prepare`."),
    regions: str = typer.Option("all", help="Comma list of regions, or 'all'."),
    run_dir: Path = typer.Option(Path("runs/simulate"), "--run-dir", help="Run folder: config, checkpoints, metrics, final teacher."),
    state_root: Optional[Path] = typer.Option(None, help="Keep each region's records (ledger, key) under STATE_ROOT/<region> "
                                                         "instead of beside its data (DATA/<region>/.fedrec)."),
    rounds: Optional[int] = typer.Option(None, help="Number of rounds (default from the config)."),
    resume: bool = typer.Option(False, help="Continue the run in --run-dir."),
    insecure: bool = typer.Option(False, "--insecure", help="Skip TLS on loopback."),
    encoder: Optional[str] = typer.Option(None, help="Encoder directory (default: bundled all-MiniLM-L6-v2)."),
    no_dp: bool = NoDP, epsilon: float = Epsilon, delta: float = Delta, max_grad_norm: float = MaxGradNorm,
    noise_multiplier: float = NoiseMultiplier, accountant: str = Accountant,
    config: Optional[Path] = ConfigOption,
    set_: List[str] = SetOption,
) -> None:
    """Run the whole federation on this machine: a SuperLink and one SuperNode per region, as
    separate processes on loopback, then tear everything down."""
    cfg = _config(config, set_, encoder)
    if rounds is not None:
        cfg.federation.rounds = rounds
    names = _regions(regions, data)            # before the slow imports and any process
    from fedrec.federation.launch import simulate as run

    budget = _budget(no_dp, epsilon, delta, max_grad_norm, noise_multiplier, accountant)
    history = run(data, names, run_dir, cfg, {r: budget for r in names}, tls=not insecure, resume=resume,
                  state_root=state_root)
    typer.echo(f"done: {len(history)} round(s); run folder {run_dir}; final teacher {run_dir / 'final'}")


# -- privacy -----------------------------------------------------------------------------------
@app.command("audit")
def audit_command(
    paths: List[Path] = typer.Argument(..., help="Run folders, region state folders or ledger files."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write an HTML report with a plot of ε per round."),
    bundle: Optional[Path] = typer.Option(None, help="Check the privacy claim of a bundle or checkpoint."),
    key: List[str] = typer.Option([], help="REGION=HEX: the region's public signing key as its privacy officer "
                                           "recorded it (`fedrec privacy status`); repeatable."),
    empirical: bool = typer.Option(False, "--empirical", help="Also measure a lower bound on ε with canaries "
                                   "(one-run audit): trains a scratch copy per region at its DP settings and "
                                   "spends from its ledger as an audit run."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --empirical: output folder of `fedrec data prepare`."),
    regions: str = typer.Option("all", help="With --empirical: comma list of regions, or 'all'."),
    state_root: Optional[Path] = typer.Option(None, help="With --empirical: region records under STATE_ROOT/<region> "
                                                         "instead of DATA/<region>/.fedrec."),
    canaries: int = typer.Option(200, help="With --empirical: canary users per region (m)."),
    confidence: float = typer.Option(0.95, help="With --empirical: confidence of the lower bound."),
    control: bool = typer.Option(True, help="With --empirical: also run the noise-off control (spends nothing)."),
    epsilon: float = Epsilon, delta: float = Delta, max_grad_norm: float = MaxGradNorm,
    noise_multiplier: float = NoiseMultiplier, accountant: str = Accountant,
    config: Optional[Path] = ConfigOption,
    set_: List[str] = SetOption,
) -> None:
    """Verify each region's signed ledger, recompute every ε (Opacus and dp-accounting), check claims;
    with --empirical, first measure each region's empirical lower bound on ε beside its accounted ε."""
    from fedrec.atomic import write_json
    from fedrec.privacy.audit import audit, format_audit, write_html

    pinned = {}
    for pair in key:
        region, sep, value = pair.partition("=")
        if not sep or not region or not value:
            raise FedrecError(f"--key {pair!r}: expected REGION=HEX")
        pinned[region] = value.strip()
    measured = []
    if empirical:
        if data is None:
            raise FedrecError("--empirical trains on the regions' data", hint="Pass --data DIR (`fedrec data prepare`'s output).")
        names = _regions(regions, data)
        cfg = _config(config, set_)
        from fedrec.federation.region import default_state_dir
        from fedrec.privacy.empirical import audit_regions, format_empirical

        states = {r: state_root / r if state_root else default_state_dir(data / r) for r in names}
        budget = _budget(False, epsilon, delta, max_grad_norm, noise_multiplier, accountant)
        measured = audit_regions(data, names, states, budget, cfg, canaries, confidence, control)
        typer.echo(format_empirical(measured))
        paths = list(paths) + [s for s in states.values() if s not in paths]
    report = audit(paths, bundle, pinned)
    typer.echo(format_audit(report))
    if json_out:
        write_json(json_out, {**report.to_json(), **({"empirical": [a.to_json() for a in measured]} if empirical else {})})
    if html_out:
        write_html(report, html_out)
    if not report.ok or not all(a.ok for a in measured):
        raise typer.Exit(1)


@privacy_app.command("plan")
def privacy_plan(users: int = typer.Option(...), batch: int = typer.Option(32), rounds: int = typer.Option(...),
                 local_epochs: float = typer.Option(1.0), epsilon: float = typer.Option(...),
                 delta: float = Delta, accountant: str = Accountant) -> None:
    """The noise multiplier σ a region needs, and whether it is too small for useful DP."""
    from fedrec.privacy.plan import plan_privacy

    plan = plan_privacy(users, batch, rounds, local_epochs, epsilon, delta, accountant)
    typer.echo(f"sample rate q = {plan.sample_rate:.4f}, {plan.steps_per_round} steps per round, "
               f"{plan.rounds} rounds\nnoise multiplier σ = {plan.noise_multiplier:.4f} "
               f"(noise per averaged step {plan.noise_per_step:.3f}·C)")
    for warning in plan.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW)


@privacy_app.command("status")
def privacy_status(states: List[Path] = typer.Argument(..., help="Region state folders (default DATA/<region>/.fedrec) or ledger files.")) -> None:
    """Lifetime ε of each region's data, run by run, and the key that signs its ledger."""
    from fedrec.privacy.status import format_status, region_status

    for state in states:
        typer.echo(format_status(region_status(state)))


@privacy_app.command("repair-ledger")
def privacy_repair_ledger(path: Path = typer.Argument(..., help="A region state folder or its ledger.jsonl.")) -> None:
    """Cut off a torn last ledger entry (a process killed while writing it); refuses any other damage."""
    from fedrec.privacy.ledger import LEDGER_FILE, Ledger

    ledger = Ledger(path / LEDGER_FILE if path.is_dir() else path)
    if not ledger.path.is_file():
        raise FedrecError(f"{ledger.path} does not exist", hint="Pass a region state folder or its ledger file.")
    typer.echo(ledger.repair())


@app.command()
def demo(
    source: Path = typer.Option(DEFAULT_SOURCE, help="UCI Online Retail file."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for every artefact."),
    epsilon: float = typer.Option(RegionBudget.epsilon, help="Each region's privacy budget ε."),
    delta: float = typer.Option(RegionBudget.delta, help="Each region's δ."),
    config: Optional[Path] = ConfigOption,
    set_: List[str] = SetOption,
) -> None:
    """The whole chain on the real data: silos → federated DP teacher → evaluation → audit."""
    from fedrec.config import FedrecConfig
    from fedrec.tools.demo import DEMO_SETTINGS, run_demo

    cfg = FedrecConfig.load(config, {**DEMO_SETTINGS, **_overrides(set_)})
    summary = run_demo(source.resolve(), out, cfg, epsilon, delta)
    if not summary["audit_ok"]:
        raise typer.Exit(1)


@app.command("distill")
def distill_command(
    teacher: Path = typer.Option(..., "--teacher", help="A teacher checkpoint, or a federated run folder (uses RUN/final)."),
    out: Path = typer.Option(..., "--out", help="Student folder: weights, tokenizer.json, student.json."),
    data: Path = typer.Option(..., "--data", help="Prepared dataset (its public catalog is all distillation reads)."),
    config: Optional[Path] = ConfigOption,
    set_: List[str] = SetOption,
) -> None:
    """Compress the teacher into a small student on public inputs only (no additional ε)."""
    from fedrec.data.silo import Catalog
    from fedrec.distill.distill import distill
    from fedrec.model.teacher import TEACHER_FILE, Teacher, pick_device

    checkpoint = teacher / "final" if not (teacher / TEACHER_FILE).exists() and (teacher / "final").is_dir() else teacher
    cfg = _config(config, set_)
    model = Teacher.load(checkpoint, Catalog.load(data / "catalog.parquet")).to(pick_device())
    student, result = distill(model, checkpoint, cfg, out)
    typer.echo(f"student saved in {out}: {student.parameter_count():,} parameters, best epoch {result.best_epoch}, "
               f"search top-10 overlap with the teacher {result.validation['search_top10_overlap']:.3f} "
               f"({result.seconds:.0f}s)")


# -- edge --------------------------------------------------------------------------------------
@app.command("export")
def export_command(
    model: Path = typer.Argument(..., help="A student or teacher checkpoint (or a run folder: uses RUN/final)."),
    out: Path = typer.Option(..., "--out", help="Bundle folder."),
    data: Path = typer.Option(..., "--data", help="Prepared dataset: its catalog becomes the bundle's items."),
    int8: bool = typer.Option(True, help="Also write INT8 graphs (weight-only, 8-bit blocks: a query ranks the same alone or batched)."),
    fp16: bool = typer.Option(False, help="Also write the FP16 query encoder, for GPUs (ONNX Runtime CUDA / TensorRT)."),
    tensorrt: bool = typer.Option(False, help="Also build a TensorRT engine from the FP16 query encoder (NVIDIA GPU + tensorrt extra)."),
    tar: bool = typer.Option(False, help="Also write OUT.tar.gz."),
    metrics: Optional[Path] = typer.Option(None, help="Evaluation JSON (`fedrec evaluate --json`) to record. Metrics "
                                                      "are computed on users' data without noise: ship only ones you may publish."),
    int8_index: bool = typer.Option(False, help="Also write an int8 item index (for catalogs of ~100k items and more)."),
    fusion: Optional[str] = typer.Option(None, help="How hybrid search fuses the model's and BM25's scores: convex:W "
                                                   "(lexical weight W) or rrf:K (reciprocal ranks); default the one "
                                                   "BENCHMARKS.md chose. `fedrec search-eval --tune-share` compares them."),
) -> None:
    """Build an edge bundle: user tower and query encoder as ONNX FP32/INT8 (FP16, TensorRT for GPUs),
    tokenizer, item matrix, hashed manifest."""
    from fedrec.data.silo import Catalog
    from fedrec.edge_runtime.fusion import DEFAULT_FUSION, Fusion
    from fedrec.export.bundle import export_bundle

    try:
        fused = Fusion.parse(fusion) if fusion else DEFAULT_FUSION
    except ValueError as exc:
        raise FedrecError(f"--fusion: {exc}") from None
    checkpoint = model / "final" if (model / "final").is_dir() else model
    recorded = json.loads(metrics.read_text()) if metrics else None
    folder = export_bundle(checkpoint, Catalog.load(data / "catalog.parquet"), out, int8, tensorrt, tar, recorded,
                           int8_index, fp16, fused)
    typer.echo(f"bundle {folder}" + (f" and {folder}.tar.gz" if tar else ""))


PRECISION = typer.Option("int8", help="int8 or fp32 (any bundle); fp16 (bundles exported with --fp16 or --tensorrt).")
MODE = typer.Option("hybrid", help="hybrid (BM25 and the model fused, as the bundle records), dense (the model) "
                                   "or lexical (BM25 over the item texts).")
DEVICE = typer.Option("cpu", help="cpu; cuda or tensorrt through ONNX Runtime's GPU providers (onnxruntime-gpu).")


def _edge(bundle: Path, precision: str, device: str):
    from fedrec.edge_runtime import BundleError, EdgeModel

    try:
        return EdgeModel(bundle, precision, device)
    except BundleError as exc:
        raise FedrecError(str(exc)) from exc


def _print_results(results) -> None:
    for rank, r in enumerate(results, 1):
        because = f"  (because you bought {r.because})" if r.because else ""
        typer.echo(f"{rank:>3}. {r.item_id:<10} {r.score:6.3f}  {r.title}{because}")


@app.command()
def recommend(bundle: Path = typer.Argument(..., help="Bundle folder or .tar.gz."),
              history: str = typer.Option(..., help="Item ids, newest first: commas within a basket, "
                                                    "';' between baskets (newest basket first)."),
              k: int = typer.Option(10, min=1, max=100), precision: str = PRECISION, device: str = DEVICE) -> None:
    """Recommendations for a purchase history, from a bundle (no torch needed)."""
    model = _edge(bundle, precision, device)
    baskets = [[i.strip() for i in basket.split(",") if i.strip()] for basket in history.split(";")]
    ids = [i for basket in baskets for i in basket]
    ages = [age for age, basket in enumerate(baskets) for _ in basket]
    if not ids:
        raise FedrecError("--history names no item id")
    known, unknown = model.known(ids)
    if not known:
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise FedrecError(f"no --history id is in the bundle's catalog: {', '.join(unknown[:10])}{more}",
                          hint="Pass item ids of the catalog the bundle was exported with.")
    if unknown:
        typer.echo(f"ignored unknown item ids: {', '.join(unknown)}", err=True)
    _print_results(model.recommend(ids, k, ages=ages))


@app.command()
def search(bundle: Path = typer.Argument(..., help="Bundle folder or .tar.gz."),
           query: str = typer.Argument(..., help="What the customer typed."),
           k: int = typer.Option(10, min=1, max=100), mode: str = MODE, precision: str = PRECISION,
           device: str = DEVICE) -> None:
    """Search the catalog with a bundle (no torch needed)."""
    from fedrec.edge_runtime.runtime import SEARCH_MODES

    if mode not in SEARCH_MODES:
        raise FedrecError(f"--mode {mode!r}: choose {', '.join(SEARCH_MODES)}")
    _print_results(_edge(bundle, precision, device).search(query, k, mode))


@app.command("search-eval")
def search_eval_command(
    bundle: Path = typer.Argument(..., help="Bundle folder or .tar.gz."),
    judgments: Path = typer.Option(..., help="CSV, Parquet or XLSX of query,item_id,relevance (a whole number "
                                             "≥ 0; 0 = judged not relevant)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report, with per-query results, here."),
    k: int = typer.Option(10, min=1, max=100),
    tune_share: float = typer.Option(0.0, min=0.0, max=0.9, help="Set this share of the queries aside to compare "
                                                                 "fusions (for `fedrec export --fusion`); the "
                                                                 "rest are evaluated."),
    precision: str = PRECISION, device: str = DEVICE,
) -> None:
    """NDCG, Recall and MRR of dense, lexical and hybrid search on judged queries, over the full
    catalog and re-ranking each query's judged items (no torch needed)."""
    from fedrec.atomic import write_json
    from fedrec.tools.search_eval import VIEWS, read_judgments, search_eval

    model = _edge(bundle, precision, device)
    judged = read_judgments(judgments, model.position)
    if judged.unknown_rows:
        typer.echo(f"skipped {judged.unknown_rows} of {judged.rows} rows: {len(judged.unknown_ids)} item ids not "
                   f"in the bundle's catalog ({', '.join(judged.unknown_ids[:5])}"
                   f"{', …' if len(judged.unknown_ids) > 5 else ''})", err=True)
    if judged.without_relevant:
        typer.echo(f"skipped {len(judged.without_relevant)} queries with no relevant catalog item", err=True)
    report = search_eval(model, judged, k, tune_share)
    typer.echo(f"{report['queries']} queries, hybrid = {report['fusion']}")
    for view in VIEWS:
        for mode, values in report[view].items():
            typer.echo(f"{view:<14} {mode:<8} " + "  ".join(f"{name} {value:.4f}" for name, value in values.items()))
    if "tuning" in report:
        tuning = report["tuning"]
        typer.echo(f"best fusion on {tuning['queries']} set-aside queries: {tuning['best']} "
                   f"(NDCG@{k} {tuning[f'ndcg@{k}'][tuning['best']]:.4f}; this bundle's "
                   f"{tuning[f'ndcg@{k}'].get(report['fusion'], float('nan')):.4f})")
    if json_out:
        write_json(json_out, {"bundle": str(bundle), "judgments": str(judgments), **report})
        typer.echo(f"wrote {json_out}")


@app.command()
def serve(bundle: Path = typer.Argument(..., help="Bundle folder or .tar.gz."),
          host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8080),
          workers: int = typer.Option(1, min=1, max=64, help="Server processes on the one port. One Python "
                                      "process uses about one core: on 2 cores, 2 served 1.3x the requests of 1 "
                                      "(BENCHMARKS.md)."),
          precision: str = PRECISION, device: str = DEVICE) -> None:
    """HTTP JSON API: /health, /recommend, /search, /similar (`fedrec-edge` serves the same without torch)."""
    from fedrec.edge_runtime import BundleError
    from fedrec.edge_runtime.cli import ServeError, serve_bundle

    try:
        serve_bundle(bundle, host, port, workers, precision, device)
    except (BundleError, ServeError) as exc:
        raise FedrecError(str(exc)) from exc
