# bash completion for mailshim(8)                             -*- shell-script -*-
#
# Self-contained: works with or without the bash-completion package.
# Queue ids come from `mailshim queue --ids` (one id per line).

_mailshim_compgen()
{
    local cur=$1 words=$2
    local IFS=$'\n'
    # shellcheck disable=SC2207
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}

_mailshim_queue_ids()
{
    local cur=$1 ids
    ids=$(command mailshim queue --ids 2>/dev/null) || ids=
    _mailshim_compgen "$cur" "$ids"
}

_mailshim_dead_ids()
{
    local cur=$1 ids
    ids=$(command mailshim queue --dead --ids 2>/dev/null) || ids=
    _mailshim_compgen "$cur" "$ids"
}

_mailshim()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev= i word
    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD - 1]}
    COMPREPLY=()

    # The value of an option that takes one.
    case $prev in
        --rcpt | --user)
            local IFS=$'\n'
            # shellcheck disable=SC2207
            COMPREPLY=($(compgen -u -- "$cur"))
            return 0
            ;;
        --host)
            local IFS=$'\n'
            # shellcheck disable=SC2207
            COMPREPLY=($(compgen -A hostname -- "$cur"))
            return 0
            ;;
        --port)
            return 0
            ;;
        -C | --config)
            local IFS=$'\n'
            compopt -o filenames 2>/dev/null
            # shellcheck disable=SC2207
            COMPREPLY=($(compgen -f -- "$cur"))
            return 0
            ;;
        --dir)
            local IFS=$'\n'
            compopt -o filenames 2>/dev/null
            # shellcheck disable=SC2207
            COMPREPLY=($(compgen -d -- "$cur"))
            return 0
            ;;
    esac

    # The words before this one that are not options or option values:
    # the command, then (for `queue`) its action.
    local -a positional=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        case $word in
            --rcpt | --host | --port | --dir | --user | -C | --config) ((i++)) ;;
            -*) ;;
            *) positional+=("$word") ;;
        esac
    done

    local command=${positional[0]-} action=${positional[1]-}
    case $command in
        '')
            if [[ $cur == -* ]]; then
                _mailshim_compgen "$cur" "--config
--version
--help"
            else
                _mailshim_compgen "$cur" "config
check
send-test
flush
run
daemon
queue
log
metrics
check-queue
sink
setup-spool
retrier"
            fi
            ;;
        config) _mailshim_compgen "$cur" "--json
--help" ;;
        check) _mailshim_compgen "$cur" "--rcpt
--json
--help" ;;
        flush | run) _mailshim_compgen "$cur" "--verbose
--help" ;;
        send-test)
            if [[ $cur == -* ]]; then
                _mailshim_compgen "$cur" "--help"
            elif [[ -z $action ]]; then
                local IFS=$'\n'
                # shellcheck disable=SC2207
                COMPREPLY=($(compgen -u -- "$cur"))
            fi
            ;;
        check-queue) _mailshim_compgen "$cur" "--warning-waiting
--critical-waiting
--warning-age
--critical-age
--warning-held
--critical-held
--warning-dead
--critical-dead
--warning-stall
--critical-stall
--spool
--probe
--config
--help" ;;
        sink) _mailshim_compgen "$cur" "--host
--port
--dir
--quiet
--help" ;;
        log)
            if [[ $cur == -* ]]; then
                _mailshim_compgen "$cur" "--summary
--day
--help"
            elif [[ -z $action ]]; then
                _mailshim_queue_ids "$cur"
            fi
            ;;
        queue)
            case $action in
                '')
                    if [[ $cur == -* ]]; then
                        _mailshim_compgen "$cur" "--json
--dead
--help"
                    else
                        _mailshim_compgen "$cur" "list
show
delete
hold
release
retry
requeue
shape"
                    fi
                    ;;
                requeue)
                    if [[ $cur == -* ]]; then
                        _mailshim_compgen "$cur" "--all
--sender
--recipient
--user
--older-than
--newer-than
--dry-run
--help"
                    else
                        _mailshim_dead_ids "$cur"
                    fi
                    ;;
                list) _mailshim_compgen "$cur" "--json
--help" ;;
                show)
                    if [[ $cur == -* ]]; then
                        _mailshim_compgen "$cur" "--all
--json
--help"
                    else
                        _mailshim_queue_ids "$cur"
                    fi
                    ;;
                shape) _mailshim_compgen "$cur" "--by
--top
--json
--help" ;;
                delete | hold | release | retry)
                    if [[ $cur == -* ]]; then
                        _mailshim_compgen "$cur" "--all
--sender
--recipient
--user
--older-than
--newer-than
--dry-run
--help"
                    else
                        _mailshim_queue_ids "$cur"
                    fi
                    ;;
            esac
            ;;
        setup-spool) _mailshim_compgen "$cur" "--user
--help" ;;
        retrier)
            case $action in
                '')
                    if [[ $cur == -* ]]; then
                        _mailshim_compgen "$cur" "--help"
                    else
                        _mailshim_compgen "$cur" "install
remove"
                    fi
                    ;;
                install) _mailshim_compgen "$cur" "--systemd
--cron
--help" ;;
                *) _mailshim_compgen "$cur" "--help" ;;
            esac
            ;;
        *) _mailshim_compgen "$cur" "--help" ;;
    esac
    return 0
}

complete -F _mailshim mailshim
