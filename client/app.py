"""The finlora ClientApp: Flower's entry point at an institution. It hands each task to :data:`client.tasks.TASKS`,
in this process or in the institution's resident trainer, and records progress for ``finlora client``."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from finlora.client.mods import client_level_clipping_mod
from finlora.client.node_settings import NodeSettings
from finlora.client.progress import record_task
from finlora.client.resident import call_trainer
from finlora.client.tasks import TASKS

app = ClientApp(mods=[client_level_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training, here or in the institution's resident trainer (``finlora client``)."""
    return Message(_run_task("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the global adapter on local validation rows, here or in the resident trainer."""
    return Message(_run_task("evaluate", msg.content, context), reply_to=msg)


@app.query("secagg")
def secagg(msg: Message, context: Context) -> Message:
    """One secure-aggregation stage (``zk.secagg``): key shares, the masked update, a survivor-set signature or
    the unmasking shares. Light work (no model) on what training left in this node's state, so it always runs in
    this process, also when a resident trainer trains."""
    return Message(TASKS["secagg"](msg.content, context), reply_to=msg)


def _run_task(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Flower starts a fresh ClientApp process per message in a deployment; when the node config names a
    resident trainer (``trainer-socket``), the work goes to that long-lived process, which keeps the base model
    and tokenized data loaded between rounds. Otherwise (simulation, or no trainer) it runs in this process."""
    node = NodeSettings.parse(context.node_config)
    if node.trainer_socket:
        reply, state = call_trainer(node.trainer_socket, kind, content, context)
        context.state = state  # what the task wrote into the node's state travels back to Flower
    else:
        reply = TASKS[kind](content, context)
    record_task(node.progress_file, context.run_config, context.run_id, kind,
                content.config_records.get("config", ConfigRecord()))
    return reply


