"""Local stand-ins for the token issuer and the Customer Insights API."""
