"""Who contributed what: contributors, adapters, their versions, the audit trail, intake."""
