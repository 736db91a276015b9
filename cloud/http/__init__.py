"""The controller's HTTP side that is no part's: the API over the fleet store (`api`), the web
dashboard (`dashboard`) and the Prometheus exposition (`metrics`). The parts add their own routes
(`Part.add_routes`); `make_app` puts them all on one aiohttp application."""
