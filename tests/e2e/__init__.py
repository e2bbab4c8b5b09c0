"""End-to-end tests of the plugin in the FiftyOne App (a real browser)."""
