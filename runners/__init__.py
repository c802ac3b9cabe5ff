"""One module per mode (train, memory, speed, report); each has ``run(cfg, env) -> dict`` of record fields."""
from omegaconf import OmegaConf

# ${or:VALUE,DEFAULT}: VALUE unless it is null (oc.select only replaces a missing key). conf/mode/report.yaml
# names a report run "report-<group>", "report-all" without report.group.
OmegaConf.register_new_resolver("or", lambda value, default: default if value is None else value, replace=True)

from .rundir import register_resolvers as _register_resolvers

_register_resolvers()  # ${unique:} of the run and sweep folder names, wherever the config is composed
