"""The shipped recipe configs (YAML), installed as package data: `fastalign configs` lists them,
`fastalign configs cp NAME DEST` copies one, `--config NAME` uses one as shipped."""
