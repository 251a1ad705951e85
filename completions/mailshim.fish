# fish completion for mailshim(8).
# Queue ids come from `mailshim queue --ids` (one id per line).

function __mailshim_queue_ids
    command mailshim queue --ids 2>/dev/null
end

function __mailshim_dead_ids
    command mailshim queue --dead --ids 2>/dev/null
end

set -l __mailshim_commands config check send-test flush run daemon queue log metrics check-queue sink setup-spool retrier
set -l __mailshim_actions list show delete hold release retry requeue shape

complete -c mailshim -f
complete -c mailshim -s h -l help -d 'Show help'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -s C -l config -r -F -d 'Read this configuration file'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -l version -d 'Show the version'

complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a config -d 'Print the effective configuration and its sources'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a check -d 'Say whether mail would flow, and why not'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a send-test -d 'Send a test message now and show the reply'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a flush -d 'Deliver everything now, due or not'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a run -d 'Deliver what is due (the retry schedule), once'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a daemon -d 'Run the spool in the foreground'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a queue -d 'List, show, delete, hold, release, retry or requeue entries'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a log -d 'Show the log lines of one message, or the day in figures'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a metrics -d 'Print the queue and delivery figures for Prometheus'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a check-queue -d 'Check the queue as a Nagios/Icinga plugin'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a sink -d 'A debugging listener'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a setup-spool -d 'Create the system spool with its owners and modes'
complete -c mailshim -n "not __fish_seen_subcommand_from $__mailshim_commands" -a retrier -d 'Set up what retries your mail where no runner runs'

complete -c mailshim -n '__fish_seen_subcommand_from config' -l json -d 'Print JSON for scripts'
complete -c mailshim -n '__fish_seen_subcommand_from flush run' -s v -l verbose -d 'Show the SMTP dialogue'
complete -c mailshim -n '__fish_seen_subcommand_from setup-spool' -l user -x -a '(__fish_complete_users)' -d 'The user the runner runs as'

complete -c mailshim -n '__fish_seen_subcommand_from check' -l rcpt -x -a '(__fish_complete_users)' -d 'Also try this recipient'
complete -c mailshim -n '__fish_seen_subcommand_from check' -l json -d 'Print JSON for scripts'

complete -c mailshim -n '__fish_seen_subcommand_from send-test' -a '(__fish_complete_users)'

complete -c mailshim -n '__fish_seen_subcommand_from sink' -l host -x -a '(__fish_print_hostnames)' -d 'Address to listen on'
complete -c mailshim -n '__fish_seen_subcommand_from sink' -l port -x -d 'Port to listen on (10025)'
complete -c mailshim -n '__fish_seen_subcommand_from sink' -l dir -x -a '(__fish_complete_directories)' -d 'Store each message in this folder'
complete -c mailshim -n '__fish_seen_subcommand_from sink' -s q -l quiet -d 'Do not print messages'

complete -c mailshim -n '__fish_seen_subcommand_from log' -a '(__mailshim_queue_ids)' -d 'Queue id'
complete -c mailshim -n '__fish_seen_subcommand_from log' -l summary -d 'Count delivered, deferred, bounced, expired'
complete -c mailshim -n '__fish_seen_subcommand_from log' -l day -x -d 'With --summary: only this day (YYYY-MM-DD)'

complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l warning-waiting -x -d 'Warning threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l critical-waiting -x -d 'Critical threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l warning-age -x -d 'Warning threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l critical-age -x -d 'Critical threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l warning-held -x -d 'Warning threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l critical-held -x -d 'Critical threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l warning-dead -x -d 'Warning threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l critical-dead -x -d 'Critical threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l warning-stall -x -d 'Warning threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l critical-stall -x -d 'Critical threshold (a range)'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l spool -x -a '(__fish_complete_directories)' -d 'The spool to check'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l probe -d 'Also connect to each listener'
complete -c mailshim -n '__fish_seen_subcommand_from check-queue' -l config -r -F -d 'The configuration file'

complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from $__mailshim_actions" -a list -d 'List the spool (the default)'
complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from $__mailshim_actions" -a show -d 'Print the envelope, state and message of entries'
complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from $__mailshim_actions" -a delete -d 'Remove entries without delivering them'
complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from $__mailshim_actions" -a hold -d 'Keep entries without trying them'
complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from $__mailshim_actions" -a release -d 'Undo hold'
complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from $__mailshim_actions" -a retry -d 'Make entries due now'
complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from $__mailshim_actions" -a requeue -d 'Put dead letters back in the queue'
complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from $__mailshim_actions" -a shape -d 'Messages per domain and age, like qshape'
complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from show delete hold release retry requeue" -l json -d 'Print JSON for scripts'
complete -c mailshim -n "__fish_seen_subcommand_from queue; and not __fish_seen_subcommand_from $__mailshim_actions" -l dead -d 'List only the dead letters'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from show delete hold release retry' -a '(__mailshim_queue_ids)' -d 'Queue id'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from show delete hold release retry' -l all -d 'Every entry'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from requeue' -a '(__mailshim_dead_ids)' -d 'Dead letter id'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from requeue' -l all -d 'Every dead letter'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from delete hold release retry requeue' -l sender -x -d 'By sender address, @domain or <>'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from delete hold release retry requeue' -l recipient -x -d 'By recipient address or @domain'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from delete hold release retry requeue' -l user -x -a '(__fish_complete_users)' -d 'By submitting user'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from delete hold release retry requeue' -l older-than -x -d 'Queued at least this long (2h, 3d)'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from delete hold release retry requeue' -l newer-than -x -d 'Queued less than this long'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from delete hold release retry requeue' -s n -l dry-run -d 'Say how many would be touched'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from shape' -l by -x -a 'recipient sender' -d 'Count by'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from shape' -l top -x -d 'Only the N biggest domains'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from shape' -l json -d 'Print JSON for scripts'
complete -c mailshim -n '__fish_seen_subcommand_from queue; and __fish_seen_subcommand_from show' -l json -d 'Print JSON with the raw values'

complete -c mailshim -n "__fish_seen_subcommand_from retrier; and not __fish_seen_subcommand_from install remove" -a install -d 'Run mailshim run at boot and every minute'
complete -c mailshim -n "__fish_seen_subcommand_from retrier; and not __fish_seen_subcommand_from install remove" -a remove -d 'Remove the retrier install set up'
complete -c mailshim -n '__fish_seen_subcommand_from retrier; and __fish_seen_subcommand_from install' -l systemd -d 'A systemd user timer'
complete -c mailshim -n '__fish_seen_subcommand_from retrier; and __fish_seen_subcommand_from install' -l cron -d 'Your crontab'
