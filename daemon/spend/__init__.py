"""Spend: what calls cost, the budgets that stop the next call, and the record of
every call's usage that the budgets and `vigil usage` are drawn from."""
