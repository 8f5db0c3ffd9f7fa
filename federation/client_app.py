"""The Flower ClientApp: a region's SuperNode answers train and evaluate messages."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.config import FedrecConfig
from fedrec.faults import freeze_point
from fedrec.federation.coordinator import from_record, to_record
from fedrec.federation.region import RegionSettings, evaluate_round, train_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = RegionSettings.from_node_config(context.node_config)
    config = FedrecConfig.from_flat(context.run_config)
    round_config = msg.content["config"]
    result = train_round(settings, config, from_record(msg.content["arrays"]),
                         int(round_config["round"]), str(round_config["run"]), str(round_config["catalog"]))
    content = RecordDict({"metrics": MetricRecord(result.metrics),
                          "info": ConfigRecord({**result.info, "status": result.status})})
    if result.adapters is not None:
        content["arrays"] = to_record(result.adapters)
    freeze_point("while-sending", f"{settings.region} round {round_config['round']}")
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings = RegionSettings.from_node_config(context.node_config)
    config = FedrecConfig.from_flat(context.run_config)
    splits = [s for s in str(msg.content["config"]["splits"]).split(",") if s]
    metrics = evaluate_round(settings, config, from_record(msg.content["arrays"]), splits)
    return Message(RecordDict({"metrics": MetricRecord(metrics),
                               "info": ConfigRecord({"region": settings.region})}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which region this node serves (so the server can name regions that drop out)."""
    settings = RegionSettings.from_node_config(context.node_config)
    return Message(RecordDict({"info": ConfigRecord({"region": settings.region})}), reply_to=msg)
