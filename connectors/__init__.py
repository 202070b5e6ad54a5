"""flowrl.connectors"""
