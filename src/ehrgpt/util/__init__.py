"""Small shared infrastructure: atomic writes, progress bars, seeding, process rank, URLs, SQL
quoting and the one TOML config reader. Each kind of thing is done here, one way."""
