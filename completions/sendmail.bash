# bash completion for mailshim's sendmail(8)                 -*- shell-script -*-
#
# Self-contained: works with or without the bash-completion package.
# Flags mirror src/mailshim/argv.py; tests/test_completions.py checks that every
# flag offered here is one the parser accepts and sendmail(8) documents.

_mailshim_sendmail_words()
{
    local cur=$1 words=$2
    local IFS=$'\n'
    # shellcheck disable=SC2207
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}

# Recipients are user names (qualified and aliased by mailshim); cron passes
# several in one word, separated by commas.
_mailshim_sendmail_recipients()
{
    local cur=$1 head=${2-}
    if [[ $cur == *,* ]]; then
        head=$head${cur%,*},
        cur=${cur##*,}
    fi
    local IFS=$'\n'
    # shellcheck disable=SC2207
    COMPREPLY=($(compgen -u -P "$head" -- "$cur"))
}

_mailshim_sendmail_files()
{
    local cur=$1 head=$2
    local IFS=$'\n'
    compopt -o filenames 2>/dev/null
    # shellcheck disable=SC2207
    COMPREPLY=($(compgen -f -P "$head" -- "$cur"))
}

# The argument of an option letter (-b m, -C file, -B 8BITMIME, ...).
_mailshim_sendmail_argument()
{
    local letter=$1 cur=$2 head=$3
    case $letter in
        b) _mailshim_sendmail_words "$head$cur" "${head}m
${head}p
${head}i
${head}v
${head}s" ;;
        o) _mailshim_sendmail_words "$head$cur" "${head}i
${head}db
${head}di
${head}dq
${head}em
${head}ee" ;;
        C | X | A) _mailshim_sendmail_files "$cur" "$head" ;;
        B) _mailshim_sendmail_words "$head$cur" "${head}7BIT
${head}8BITMIME" ;;
        N) _mailshim_sendmail_words "$head$cur" "${head}never
${head}success
${head}failure
${head}delay
${head}success,failure
${head}success,failure,delay" ;;
        R) _mailshim_sendmail_words "$head$cur" "${head}full
${head}hdrs" ;;
        f | r) _mailshim_sendmail_recipients "$cur" "$head" ;;
        *) COMPREPLY=() ;;
    esac
}

_mailshim_sendmail()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev= i
    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD - 1]}
    COMPREPLY=()

    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ ${COMP_WORDS[i]} == -- ]]; then
            _mailshim_sendmail_recipients "$cur"
            return 0
        fi
    done

    # "-f user", "-tiC file": the previous word ends in a letter taking an argument.
    if [[ $prev =~ ^-[GIUcimntvx]*([ABCFLNORVXbefhopr])$ ]]; then
        _mailshim_sendmail_argument "${BASH_REMATCH[1]}" "$cur" ""
        return 0
    fi

    # "-Cfile", "-B8BITMIME": the argument attached to its letter.
    if [[ $cur =~ ^(-[GIUcimntvx]*)([CXABNRf])(.*)$ ]]; then
        local letter=${BASH_REMATCH[2]}
        local head=${BASH_REMATCH[1]}$letter rest=${BASH_REMATCH[3]}
        if [[ -n $rest || $letter == C ]]; then
            _mailshim_sendmail_argument "$letter" "$rest" "$head"
            return 0
        fi
    fi

    case $cur in
        -b*)
            _mailshim_sendmail_words "$cur" "-bm
-bp
-bi
-bv
-bs"
            ;;
        -o*)
            _mailshim_sendmail_words "$cur" "-oi
-odb
-odi
-odq
-oem
-oee"
            ;;
        -*)
            _mailshim_sendmail_words "$cur" "-bm
-bp
-bi
-bv
-bs
-t
-i
-oi
-f
-r
-F
-C
-odb
-odi
-odq
-v
-q
-I
-O
-B
-N
-R
-V
-X
-L
-h
-oem
-oee
--"
            ;;
        *)
            _mailshim_sendmail_recipients "$cur"
            ;;
    esac
    return 0
}

complete -F _mailshim_sendmail sendmail /usr/sbin/sendmail /usr/lib/sendmail
