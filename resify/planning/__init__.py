"""Stage 3, planning: from the analysis and the policy to the plan, a frozen record of what to add and why.

``policy`` holds the keywords (one table) and validates them; ``planner`` makes the plan (``patterns``
applies include/exclude, ``geometry`` and ``budget`` choose and price the projections); ``gating``
chooses each site's gate under ``gate='auto'`` (on the forward ``gate_signal`` measures; each choice
says why in ``gate_reasons``); ``owners`` places each site in the module whose forward holds it;
``sites`` and ``skips`` are the plan's records; ``plan_files`` reads saved plans.
"""
